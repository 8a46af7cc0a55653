"""One image decoder for training, evaluation and the shard tools: bytes or a file -> an 8-bit RGB PIL image.

What web images need beyond ``Image.open(...).convert("RGB")``:

* **Transparency** (RGBA, LA, PA, a palette or grey/RGB image with a ``transparency`` entry) is composited on white,
  as img2dataset does. ``convert("RGB")`` would keep the colour stored under transparent pixels, usually black, and
  turn logos, icons and clip art into dark silhouettes.
* **16-bit greyscale** (PNG ``I;16`` / ``I``) is scaled to 8 bits (``v / 257``); ``convert("RGB")`` clips it, so
  everything above 255 of 65,535 becomes white. 16-bit RGB(A) PNGs already load as 8-bit RGB(A) in PIL.
* **CMYK, greyscale, 1-bit, palette, YCbCr** go through PIL's conversion to RGB.
* **A pixel limit** (``data.max_image_pixels``): an image with more pixels is refused from its header, before any
  pixel is decoded, with ``ImageTooLarge`` (a ``DecodeError``), which callers count as a skip and name. PIL's own
  decompression-bomb guard is raised to at least this limit, so ours is the one that decides.

JPEGs much larger than needed decode at a reduced DCT scale (libjpeg draft mode) when ``min_size`` is given.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

DEFAULT_MAX_PIXELS = 100_000_000  # 10,000 x 10,000: far above any training image, below PIL's bomb error (179M)


class DecodeError(ValueError):
    """An image that cannot be used: corrupt or truncated bytes, an unknown format, or over the pixel limit."""


class ImageTooLarge(DecodeError):
    """More pixels than the configured limit (``data.max_image_pixels``); refused from the header alone."""


def _open(source: bytes | str | Path, max_pixels: int) -> Image.Image:
    if max_pixels and (Image.MAX_IMAGE_PIXELS or 0) < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels  # PIL warns above this and refuses above twice it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source)
        except Image.DecompressionBombError as err:
            raise ImageTooLarge(str(err)) from err
    if max_pixels and img.width * img.height > max_pixels:
        raise ImageTooLarge(f"{img.width} x {img.height} = {img.width * img.height:,} pixels is over the limit of "
                            f"{max_pixels:,} (data.max_image_pixels)")
    return img


def _on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB, transparency composited on white, 16-bit grey scaled (see the module doc)."""
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        return _on_white(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # PNG's 16-bit grey; 'I' (32-bit) also comes from 16-bit PNGs, so its range is taken as 16 bits.
        values = np.asarray(img, dtype=np.float64)
        grey = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if img.mode == "F":  # float images (TIFF): taken as 0..1 when they fit, else as 0..255
        values = np.asarray(img, dtype=np.float64)
        scale = 255.0 if values.size and np.nanmax(values) <= 1.0 else 1.0
        return Image.fromarray(np.clip(np.rint(np.nan_to_num(values) * scale), 0, 255).astype(np.uint8),
                               "L").convert("RGB")
    return img.convert("RGB")


def load_rgb(source: bytes | str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, min_size: int = 0) -> Image.Image:
    """Decode image bytes or a file to an 8-bit RGB image (see the module doc). ``max_pixels`` 0: no limit of ours.
    ``min_size``: a JPEG may decode at a reduced scale that keeps both sides >= min_size.

    Raises ``ImageTooLarge`` over the pixel limit and ``DecodeError`` for anything else PIL cannot read; a missing
    file raises ``FileNotFoundError`` as usual."""
    try:
        img = _open(source, max_pixels)
        if min_size and img.format == "JPEG":
            img.draft("RGB", (min_size, min_size))
        img.load()
        return to_rgb(img)
    except (DecodeError, FileNotFoundError):
        raise
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, struct.error ...
        raise DecodeError(str(err) or type(err).__name__) from err


def check_decodable(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Fail exactly when ``load_rgb`` would, at a fraction of its cost: JPEGs are entropy-decoded in full (so
    truncation is caught) but reconstructed at 1/8 scale. Used to skip samples without decoding them."""
    load_rgb(data, max_pixels=max_pixels, min_size=1)


def image_size(source: bytes | str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int, str]:
    """(width, height, format) from the header only; raises like ``load_rgb`` for unreadable or too large images."""
    try:
        img = _open(source, max_pixels)
    except (DecodeError, FileNotFoundError):
        raise
    except Exception as err:
        raise DecodeError(str(err) or type(err).__name__) from err
    return img.width, img.height, img.format or ""
