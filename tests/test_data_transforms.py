"""CLIP transforms: normalisation, the random crop's distribution, decode checks that agree with decoding."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from alignclip.data import images
from alignclip.data import transforms as T


def _jpeg(width: int, height: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_normalize_batch_is_clip_mean_std_in_chw():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (6, 7, 3), dtype=np.uint8) for _ in range(3)]
    reference = (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).double() / 255
                 - torch.tensor(T.CLIP_MEAN, dtype=torch.float64).view(1, 3, 1, 1)) \
        / torch.tensor(T.CLIP_STD, dtype=torch.float64).view(1, 3, 1, 1)
    out = T.normalize_batch(images)
    assert out.shape == (3, 3, 6, 7) and out.dtype == torch.float32 and out.is_contiguous()
    assert torch.allclose(out.double(), reference, atol=1e-6)
    assert torch.allclose(T.denormalize(out).double(), reference.new_tensor(np.stack(images)).permute(0, 3, 1, 2)
                          / 255, atol=1e-6)


def test_random_resized_crop_keeps_90_to_100_percent_of_the_area_within_the_ratio_range():
    rng = np.random.default_rng(1)
    # 256 x 400 is narrower than 3/4: few crops fit, and torchvision's fallback (the largest centre crop of ratio
    # 3/4, 85% of the area here) takes over.
    for width, height, min_area in [(256, 256, 0.88), (320, 256, 0.88), (256, 400, 0.85)]:
        areas, ratios = [], []
        for _ in range(300):
            left, top, right, bottom = T.random_resized_crop_box(width, height, T.crop_draws(rng))
            assert 0 <= left < right <= width and 0 <= top < bottom <= height
            areas.append((right - left) * (bottom - top) / (width * height))
            ratios.append((right - left) / (bottom - top))
        assert min_area <= min(areas) and max(areas) <= 1.0
        assert min(ratios) >= 0.74 and max(ratios) <= 1.34
    same = np.random.default_rng(5).random(T.CROP_DRAWS)
    assert T.random_resized_crop_box(256, 256, same) == T.random_resized_crop_box(256, 256, same.copy())
    out = T.train_transform(images.load_rgb(_jpeg(256, 300)), 64, same)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8


def test_eval_transform_centre_crops_the_short_side():
    img = Image.new("RGB", (300, 100), (0, 0, 0))
    img.paste((255, 255, 255), (100, 0, 200, 100))  # the white centre square is all that should remain
    out = T.eval_transform(img, 50)
    assert out.shape == (50, 50, 3) and out[2:-2, 2:-2].min() == 255


def test_decode_check_fails_exactly_where_decoding_fails():
    good = _jpeg(512, 384)
    cases = {"good": good, "truncated": good[: len(good) * 2 // 3], "garbage": b"\xff\xd8\xff" + b"x" * 500,
             "empty": b""}
    for name, data in cases.items():
        try:
            images.load_rgb(data, min_size=224)
            decodes = True
        except images.DecodeError:
            decodes = False
        try:
            images.check_decodable(data)
            checks = True
        except images.DecodeError:
            checks = False
        assert decodes == checks == (name == "good"), name
    # Draft decoding of a large JPEG keeps both sides >= the size asked for.
    big = images.load_rgb(_jpeg(1024, 800), min_size=224)
    assert big.mode == "RGB" and min(big.size) >= 224 and big.size[0] < 1024


def test_uint8_batches_normalised_on_the_device_equal_the_host_normalisation_bit_for_bit():
    rng = np.random.default_rng(1)
    pictures = [rng.integers(0, 256, (24, 20, 3), dtype=np.uint8) for _ in range(5)]
    host = T.normalize_batch(pictures)
    moved = T.stack_uint8(pictures, shared=True)
    assert moved.dtype == torch.uint8 and moved.shape == (5, 3, 24, 20) and moved.is_shared()
    assert moved.element_size() * moved.nelement() * 4 == host.element_size() * host.nelement()
    assert torch.equal(T.normalize_on_device(moved), host)  # same float32 arithmetic: identical values
    assert T.normalize_on_device(moved, torch.bfloat16).dtype == torch.bfloat16
    assert torch.equal(T.normalize_on_device(host), host)  # an already normalised batch is only cast
