"""``data.decode: gpu``: JPEGs travel compressed from the workers and are decoded, cropped and resized in batches
where the model runs (``torchvision.io.decode_jpeg``: nvJPEG on CUDA, libjpeg-turbo on the CPU).

Workers read, check and tokenise as with ``decode: cpu`` and draw the same crop (``transforms.crop_draws``), so the
data order, the skips and exact resume do not depend on where images are decoded. A YCbCr JPEG (``images.
fast_jpeg_size``) is checked to decode (``images.check_decodable``, the 1/8-scale entropy decode that resume uses)
and handed over as its bytes plus its crop box in full-size pixels; every other image (PNG, WebP, greyscale or
CMYK JPEG, transparency) is decoded and cropped in the worker as with ``decode: cpu`` and travels as pixels. A
batch then holds:

* ``image``: uint8 [k, 3, S, S], the k worker-decoded rows, in batch order (k = 0 when all are JPEGs);
* ``jpeg``: uint8 [n], the JPEG bytes of the other rows, concatenated; ``jpeg_offsets``: int64 [b + 1], row ``i``'s
  bytes are ``jpeg[offsets[i]:offsets[i + 1]]`` (empty for worker-decoded rows); ``crop``: int64 [b, 4], each row's
  box (left, top, right, bottom).

``device_images(batch, device)`` is the trainer's side: the finished uint8 [b, 3, S, S] batch on ``device``, the
same crop and filter as ``transforms.train_pixels`` (decoded at full size: no DCT scaling).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from alignclip.data import images as I
from alignclip.data import transforms as T


@dataclass
class CompressedCrop:
    """A JPEG the device decodes, and its crop box in full-size pixels."""

    data: bytes
    box: tuple[int, int, int, int]


def compressed_crop(data: bytes, draws: np.ndarray, max_pixels: int = I.DEFAULT_MAX_PIXELS) -> CompressedCrop | None:
    """The JPEG and its crop when the device can decode it; None for an image the worker decodes itself. Raises
    ``images.DecodeError`` exactly when decoding would (so the batch holds the same samples as with ``cpu``)."""
    size = I.fast_jpeg_size(data)
    if size is None:
        return None
    I.check_decodable(data, max_pixels)
    return CompressedCrop(data, T.random_resized_crop_box(*size, draws))


def pack(items: list[torch.Tensor | CompressedCrop], image_size: int, shared: bool = False) -> dict[str, torch.Tensor]:
    """A batch's images: worker-decoded crops ([3, S, S] tensors) and compressed ones, as the module doc lays out."""
    lengths = [len(item.data) if isinstance(item, CompressedCrop) else 0 for item in items]
    offsets = torch.zeros(len(items) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(np.cumsum(lengths), dtype=torch.int64)
    pixels = [item for item in items if not isinstance(item, CompressedCrop)]
    out = {"image": T.empty_batch(len(pixels), image_size, shared),
           "jpeg": torch.empty(int(offsets[-1]), dtype=torch.uint8),
           "jpeg_offsets": offsets, "crop": torch.zeros((len(items), 4), dtype=torch.int64)}
    if shared:
        for name in ("jpeg", "jpeg_offsets", "crop"):
            out[name].share_memory_()
    jpeg = out["jpeg"].numpy()
    for i, item in enumerate(items):
        if isinstance(item, CompressedCrop):
            jpeg[offsets[i]:offsets[i + 1]] = np.frombuffer(item.data, np.uint8)
            out["crop"][i] = torch.tensor(item.box)
    for row, item in zip(out["image"], pixels):
        row.copy_(item)
    return out


def device_images(batch: dict, device: torch.device | str) -> torch.Tensor:
    """The batch's uint8 [b, 3, S, S] images on ``device``: decoded and cropped there when the batch carries JPEGs
    (``decode: gpu``), else ``batch["image"]`` as it is (the caller moves it)."""
    if "jpeg" not in batch:
        return batch["image"]
    offsets = batch["jpeg_offsets"].tolist()
    rows = [i for i in range(len(offsets) - 1) if offsets[i + 1] > offsets[i]]
    if not rows:  # every image decoded in the workers: the batch is complete
        return batch["image"]
    device = torch.device(device)
    images = T.empty_batch(len(offsets) - 1, batch["image"].shape[-1], device=device)
    others = [i for i in range(len(offsets) - 1) if offsets[i + 1] == offsets[i]]
    if others:
        images[others] = batch["image"].to(device, non_blocking=True)
    decoded = decode_jpegs([batch["jpeg"][offsets[i]:offsets[i + 1]] for i in rows], device)
    boxes = batch["crop"].tolist()
    for i, pixels in zip(rows, decoded):
        images[i] = T.resize_crop(pixels, tuple(boxes[i]), images.shape[-1])
    return images


def decode_jpegs(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """uint8 [3, H, W] images on ``device``, full size: one batched ``decode_jpeg`` call; if it fails, image by
    image, and an image the device decoder refuses (a JPEG feature nvJPEG lacks) is decoded on the host."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        pass
    out = []
    for data in encoded:
        try:
            out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:  # it passed check_decodable in the worker, so the host decoder takes it
            out.append(T.hwc_as_chw(np.asarray(I.load_rgb(data.numpy().tobytes(), max_pixels=0))).to(device))
    return out
