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

Training decodes with ``decode_for_crop``: YCbCr JPEGs (nearly all of CC12M) go through libjpeg-turbo directly
(``simplejpeg``, at the smallest DCT scale that keeps the crop at least the output size), everything else, and any
JPEG that libjpeg-turbo reports a problem with, through ``load_rgb``. So an image is usable exactly when
``load_rgb`` can decode it (libjpeg-turbo's strict mode refuses every JPEG it warns about, and PIL decides those).
"""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import simplejpeg
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
    _check_pixels(img.width, img.height, max_pixels)
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


def fast_jpeg_size(data: bytes) -> Optional[tuple[int, int]]:
    """(width, height) of a YCbCr JPEG, the kind libjpeg-turbo and nvJPEG decode straight to RGB; None for anything
    else (PNG, WebP, greyscale or CMYK JPEG, an unreadable header), which goes through ``load_rgb``."""
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return (width, height) if colorspace == "YCbCr" and width > 0 and height > 0 else None


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if max_pixels and width * height > max_pixels:
        raise ImageTooLarge(f"{width} x {height} = {width * height:,} pixels is over the limit of {max_pixels:,} "
                            f"(data.max_image_pixels)")


Box = tuple[int, int, int, int]  # left, top, right, bottom in pixels


def decode_for_crop(data: bytes, box_of: Callable[[int, int], Box], out_size: int,
                    max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, Box]:
    """Decode image bytes for a crop of ``box_of(width, height)`` (full-size coordinates) that will be resized to
    ``out_size``: uint8 RGB HWC pixels and the box in their coordinates. A JPEG decodes at the smallest DCT scale
    (1, 1/2, 1/4, 1/8, as PIL's draft mode) that keeps the crop >= ``out_size`` on both sides; the box is then
    scaled and rounded to whole pixels of the decoded image. Raises like ``load_rgb``."""
    size = fast_jpeg_size(data)
    if size is not None:
        _check_pixels(*size, max_pixels)
        box = box_of(*size)
        try:
            pixels = simplejpeg.decode_jpeg(data, "RGB", **_min_decoded_size(size, box, out_size))
            return pixels, _scaled_box(box, size, pixels)
        except ValueError:
            pass  # a JPEG libjpeg-turbo warns about: PIL decides, as in load_rgb
    try:
        img = _open(data, max_pixels)
        size = img.size
        box = box_of(*size)
        if img.format == "JPEG":
            need = _min_decoded_size(size, box, out_size)
            img.draft("RGB", (need["min_width"], need["min_height"]))
        img.load()
        pixels = np.array(to_rgb(img))  # writable (asarray of a PIL image is read-only): torch takes it as is
    except (DecodeError, FileNotFoundError):
        raise
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, struct.error ...
        raise DecodeError(str(err) or type(err).__name__) from err
    return pixels, _scaled_box(box, size, pixels)


def _min_decoded_size(size: tuple[int, int], box: Box, out_size: int) -> dict[str, int]:
    """The decoded width and height asked of libjpeg: the full size over the largest power of two (1 .. 8) that
    keeps the box >= ``out_size`` pixels each way (libjpeg-turbo's other scales, 7/8, 3/4 ..., alias visibly)."""
    width, height = size
    span = min(box[2] - box[0], box[3] - box[1])
    factor = 1
    while factor < 8 and span >= 2 * factor * out_size:
        factor *= 2
    return {"min_width": math.ceil(width / factor), "min_height": math.ceil(height / factor)}


def _scaled_box(box: Box, size: tuple[int, int], pixels: np.ndarray) -> Box:
    height, width = pixels.shape[:2]
    if (width, height) == tuple(size):
        return box
    sx, sy = width / size[0], height / size[1]
    left, top = min(round(box[0] * sx), width - 1), min(round(box[1] * sy), height - 1)
    return left, top, max(min(round(box[2] * sx), width), left + 1), max(min(round(box[3] * sy), height), top + 1)


def image_size(source: bytes | str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int, str]:
    """(width, height, format) from the header only; raises like ``load_rgb`` for unreadable or too large images."""
    try:
        img = _open(source, max_pixels)
    except (DecodeError, FileNotFoundError):
        raise
    except Exception as err:
        raise DecodeError(str(err) or type(err).__name__) from err
    return img.width, img.height, img.format or ""
