"""CLIP's image transforms, with the randomness passed in so that a batch is a pure function of its seed.

Train: RandomResizedCrop(image_size, scale=(0.9, 1.0), ratio=(3/4, 4/3)) as torchvision defines it on a tensor:
crop the box (whole pixels of the full-size image), then resize the crop to image_size x image_size with the
antialiased bicubic filter (Keys' cubic, a = -0.5, widened by the downscale factor, clamped at the crop's edges),
then CLIP mean/std (as OpenCLIP's training preset). ``train_pixels`` does it from image bytes: JPEGs decode at the
smallest power-of-two DCT scale that keeps the crop >= image_size (``images.decode_for_crop``) and the resize is
torch's uint8 kernel (``resize_crop``): within 4 levels (mean < 0.3) of a float64 reference of that definition
without DCT scaling, mean < 1.5 levels with it (tests/test_data_transforms.py).
Eval: OpenCLIP's evaluation preprocess (``resize_mode='shortest'``) to the pixel: resize the short side to
image_size (the long side truncated, as torchvision's Resize), bicubic, then centre-crop (the offset rounded as
torchvision's CenterCrop); ``ImageTransform``.
Training batches leave the workers as uint8 (``stack_uint8``) and are normalised with CLIP mean/std on the device
(``normalize_on_device``); evaluation batches are normalised on the host (``normalize_batch``), with the same
float32 arithmetic.

The random crop draws a fixed number of uniforms per sample (``CROP_DRAWS``) whatever the image size, so a reader
that skips samples (``start_batch``) stays in step with one that decodes them.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from alignclip.data import images as I

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TRAIN_CROP_SCALE = (0.9, 1.0)
TRAIN_CROP_RATIO = (3 / 4, 4 / 3)
_ATTEMPTS = 10  # torchvision's number of tries before falling back to a centre crop
CROP_DRAWS = (_ATTEMPTS, 4)  # per attempt: area scale, log aspect ratio, top, left


def crop_draws(rng: np.random.Generator) -> np.ndarray:
    return rng.random(CROP_DRAWS)


def random_resized_crop_box(width: int, height: int, draws: np.ndarray, scale=TRAIN_CROP_SCALE,
                            ratio=TRAIN_CROP_RATIO) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop parameters from pre-drawn uniforms; returns a (left, top, right, bottom) box."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for u_scale, u_ratio, u_top, u_left in draws:
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u_scale)
        aspect = math.exp(log_lo + (log_hi - log_lo) * u_ratio)
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(u_top * (height - h + 1))
            left = int(u_left * (width - w + 1))
            return left, top, left + w, top + h
    # Fallback: the largest centre crop whose aspect ratio lies within the range.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def shortest_edge_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) with the short side ``size`` and the long side ``int(size * long / short)``: torchvision's
    ``Resize(size)`` (OpenCLIP's ``resize_mode='shortest'``), which HF's ``CLIPImageProcessor`` also computes."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def resize_crop(image: torch.Tensor, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """uint8 [3, H, W] (any strides, any device) -> the box resized to uint8 [3, size, size], antialiased bicubic.
    On the CPU torch's uint8 kernel (fixed-point, SIMD), fed a channels-last copy of the crop (its fastest layout:
    the copy costs less than the kernel saves), out channels-last (HWC in memory); elsewhere in float32, rounded."""
    left, top, right, bottom = box
    crop = image[None, :, top:bottom, left:right]
    if image.device.type == "cpu":
        crop = crop.contiguous(memory_format=torch.channels_last)
        return F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0]
    out = F.interpolate(crop.float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0]
    return out.round_().clamp_(0, 255).to(torch.uint8)


def hwc_as_chw(pixels: np.ndarray) -> torch.Tensor:
    """A decoder's uint8 HWC array as a [3, H, W] tensor view, no copy."""
    if not pixels.flags.writeable:  # PIL's arrays are read-only, which torch.from_numpy warns about
        pixels = pixels.copy()
    return torch.from_numpy(pixels).permute(2, 0, 1)


def train_pixels(data: bytes, image_size: int, draws: np.ndarray,
                 max_pixels: int = I.DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Image bytes -> the training crop, uint8 [3, image_size, image_size] (see the module doc). Raises
    ``images.DecodeError`` (``ImageTooLarge``) exactly when ``images.load_rgb`` would."""
    pixels, box = I.decode_for_crop(data, lambda w, h: random_resized_crop_box(w, h, draws), image_size, max_pixels)
    return resize_crop(hwc_as_chw(pixels), box, image_size)


def center_crop_offset(side: int, size: int) -> int:
    """torchvision's CenterCrop offset: ``int(round((side - size) / 2))``, half to even. HF's PIL backend floors
    it instead, one pixel apart when ``side - size`` is 3 modulo 4 (docs/analysis.md)."""
    return int(round((side - size) / 2.0))


def eval_transform(img: Image.Image, image_size: int) -> np.ndarray:
    """Resize the short side to ``image_size`` (bicubic), then centre-crop: OpenCLIP's evaluation preprocess."""
    width, height = shortest_edge_size(img.width, img.height, image_size)
    resized = img.resize((width, height), Image.Resampling.BICUBIC)
    left, top = center_crop_offset(width, image_size), center_crop_offset(height, image_size)
    return np.asarray(resized.crop((left, top, left + image_size, top + image_size)))


class ImageTransform:
    """PIL image(s) -> float [3, H, W] (or [b, 3, H, W] for a list): the evaluation transform, exactly OpenCLIP's
    ``preprocess`` of an export (and HF ``CLIPImageProcessor``'s PIL backend but for its floored crop offset).
    Images with transparency are composited on white first (``alignclip.data.images.to_rgb``, as everywhere in
    alignclip); OpenCLIP and HF drop the alpha channel instead, so give them ``to_rgb(image)`` to get our pixels."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def __call__(self, images):
        many = isinstance(images, (list, tuple))
        arrays = [eval_transform(I.to_rgb(img), self.image_size) for img in (images if many else [images])]
        batch = normalize_batch(arrays)
        return batch if many else batch[0]


_SCALE = np.array([1.0 / (255.0 * s) for s in CLIP_STD], np.float32)
_SHIFT = np.array([m / s for m, s in zip(CLIP_MEAN, CLIP_STD)], np.float32)


def normalize_batch(images: list[np.ndarray], shared: bool = False) -> torch.Tensor:
    """uint8 HWC arrays -> float [b, 3, H, W] with CLIP mean/std: (x / 255 - mean) / std = x * scale - shift.

    One channel at a time, uint8 read straight into the float32 output (no intermediate float copy): ~3x faster
    than transposing and converting the whole batch. Evaluation batches use it; training batches travel as uint8
    (``stack_uint8``) and are normalised on the device (``normalize_on_device``, the same float32 arithmetic).
    ``shared``: write into shared memory, so a DataLoader worker hands the batch over without copying it."""
    stacked = np.stack(images)
    shape = (stacked.shape[0], 3, stacked.shape[1], stacked.shape[2])
    tensor = torch.empty(shape, dtype=torch.float32)
    if shared:
        tensor.share_memory_()
    out = tensor.numpy()
    for c in range(3):
        np.multiply(stacked[..., c], _SCALE[c], out=out[:, c], dtype=np.float32)
        out[:, c] -= _SHIFT[c]
    return tensor


def stack_uint8(images: list[np.ndarray] | list[torch.Tensor], shared: bool = False) -> torch.Tensor:
    """uint8 HWC arrays (or [3, H, W] tensors) -> uint8 [b, 3, H, W], a quarter of float32's bytes to hand from a
    worker to the trainer (in shared memory when ``shared``); ``normalize_on_device`` finishes the job where the
    model runs."""
    if isinstance(images[0], torch.Tensor):  # training crops: one copy each, straight into the batch
        tensor = empty_batch(len(images), images[0].shape[-1], shared)
        for row, image in zip(tensor, images):
            row.copy_(image)
        return tensor
    stacked = np.stack(images)
    tensor = torch.empty((stacked.shape[0], 3, stacked.shape[1], stacked.shape[2]), dtype=torch.uint8)
    if shared:
        tensor.share_memory_()
    tensor.numpy()[...] = stacked.transpose(0, 3, 1, 2)
    return tensor


def empty_batch(batch: int, size: int, shared: bool = False, device: torch.device | str = "cpu") -> torch.Tensor:
    """An uninitialised uint8 [b, 3, size, size] training batch, channels-last in memory (NHWC, as ``resize_crop``
    returns crops, so filling a row is a plain copy); ``.to(device)``, pinning and ``normalize_on_device`` keep the
    layout, which is also what ``fast_path.channels_last`` asks of the model's input."""
    tensor = torch.empty((batch, size, size, 3), dtype=torch.uint8, device=device)
    if shared:
        tensor.share_memory_()
    return tensor.permute(0, 3, 1, 2)


_DEVICE_CONSTANTS: dict = {}


def normalize_on_device(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A uint8 [b, 3, H, W] batch (already on its device) -> CLIP-normalised ``dtype``; computed in float32 as
    ``normalize_batch`` does (x * scale - shift per channel), so the values are the same bit for bit. A floating
    batch (already normalised, e.g. an evaluation batch) is only cast."""
    if images.dtype != torch.uint8:
        return images.to(dtype)
    key = images.device
    if key not in _DEVICE_CONSTANTS:
        _DEVICE_CONSTANTS[key] = (torch.from_numpy(_SCALE).view(1, 3, 1, 1).to(key),
                                  torch.from_numpy(_SHIFT).view(1, 3, 1, 1).to(key))
    scale, shift = _DEVICE_CONSTANTS[key]
    return (images.to(torch.float32) * scale - shift).to(dtype)


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """The inverse, to [0, 1] floats (for plots and pixel checks)."""
    return images * torch.tensor(CLIP_STD).view(1, 3, 1, 1) + torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)

