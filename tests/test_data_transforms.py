"""CLIP transforms: normalisation, the random crop's distribution, decode checks that agree with decoding, and the
training crop's pixels against a float64 reference of the documented transform."""

from __future__ import annotations

import io

import numpy as np
import pytest
import simplejpeg
import torch
from PIL import Image

from alignclip.data import images
from alignclip.data import transforms as T


def _jpeg(width: int, height: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _photo(width: int, height: int, seed: int = 0, fmt: str = "JPEG") -> bytes:
    """Smooth colour fields plus edges and grain: what photographs look like to a resampling filter."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), np.float64)
    img[:, width // 3: width // 3 + 3] = 255  # a sharp line
    img += rng.normal(0, 8, img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format=fmt, quality=90)
    return buf.getvalue()


def _keys_cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1, (a + 2) * x**3 - (a + 3) * x**2 + 1,
                    np.where(x < 2, a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a, 0.0))


def _resample_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of the antialiased bicubic filter: Keys' cubic (a = -0.5) widened by the downscale
    factor, centred on each output pixel's centre, cut at the input's edges and renormalised."""
    scale = n_in / n_out
    stretch = max(scale, 1.0)
    out = np.zeros((n_out, n_in))
    for i in range(n_out):
        centre = (i + 0.5) * scale
        lo, hi = max(int(np.floor(centre - 2 * stretch + 0.5)), 0), min(int(np.floor(centre + 2 * stretch + 0.5)), n_in)
        j = np.arange(lo, hi)
        w = _keys_cubic((j - centre + 0.5) / stretch)
        out[i, lo:hi] = w / w.sum()
    return out


def _reference_crop(rgb: np.ndarray, box, size: int) -> np.ndarray:
    """The documented training transform in float64: crop the box, resize to size x size, round; HWC."""
    left, top, right, bottom = box
    crop = rgb[top:bottom, left:right].astype(np.float64)
    out = np.einsum("oh,hwc->owc", _resample_matrix(crop.shape[0], size), crop)
    out = np.einsum("pw,owc->opc", _resample_matrix(crop.shape[1], size), out)
    return np.clip(np.rint(out), 0, 255)


def test_training_crops_are_within_stated_levels_of_a_float_reference_of_the_documented_transform():
    """Tolerance of the CPU path (libjpeg-turbo decode + torch's fixed-point uint8 bicubic) against the float64
    reference on PIL's full-size decode. Without DCT scaling (a 256-px photo to 224, 384 to 224, 300 x 200 to 160,
    40 x 30 upsampled to 64, a PNG): mean < 0.3 levels, at most 4 anywhere (the uint8 kernel clips and rounds
    between its horizontal and vertical passes, which shows at sharp edges). With DCT scaling (300 x 200 to 64 and
    1024 x 800 to 224 decode at 1/2 or 1/4: libjpeg's scaled IDCT stands in for part of the downscale): mean < 1.5
    levels, 99th percentile <= 6."""
    rng = np.random.default_rng(7)
    exact, scaled = (0.3, 1, 4), (1.5, 6, None)  # mean, 99th percentile, max
    cases = [(_photo(256, 256, 1), 224, exact), (_photo(384, 384, 6), 224, exact), (_photo(300, 200, 2), 160, exact),
             (_photo(40, 30, 3), 64, exact), (_photo(120, 90, 4, "PNG"), 64, exact),
             (_photo(300, 200, 2), 64, scaled), (_photo(1024, 800, 5), 224, scaled)]
    for data, size, (mean_levels, p99_levels, max_levels) in cases:
        rgb = np.asarray(images.load_rgb(data))
        for _ in range(2):
            draws = T.crop_draws(rng)
            got = T.train_pixels(data, size, draws).permute(1, 2, 0).numpy().astype(np.float64)
            want = _reference_crop(rgb, T.random_resized_crop_box(rgb.shape[1], rgb.shape[0], draws), size)
            diff = np.abs(got - want)
            assert diff.mean() < mean_levels and np.percentile(diff, 99) <= p99_levels, (rgb.shape, diff.mean())
            if max_levels is not None:
                assert diff.max() <= max_levels, (rgb.shape, diff.max())


def test_the_fast_jpeg_decoder_equals_pil_bit_for_bit_and_other_kinds_go_through_pil():
    data = _photo(300, 200, 9)
    assert images.fast_jpeg_size(data) == (300, 200)
    pixels, box = images.decode_for_crop(data, lambda w, h: (0, 0, w, h), 224)
    assert box == (0, 0, 300, 200) and np.array_equal(pixels, np.asarray(images.load_rgb(data)))
    grey, cmyk = io.BytesIO(), io.BytesIO()
    Image.open(io.BytesIO(data)).convert("L").save(grey, format="JPEG")
    Image.open(io.BytesIO(data)).convert("CMYK").save(cmyk, format="JPEG")
    for other in (grey.getvalue(), cmyk.getvalue(), _photo(30, 20, 1, "PNG"), _photo(30, 20, 1, "WEBP")):
        assert images.fast_jpeg_size(other) is None
        pixels, _ = images.decode_for_crop(other, lambda w, h: (0, 0, w, h), 4096)  # no DCT scaling
        assert np.array_equal(pixels, np.asarray(images.load_rgb(other)))
    # DCT scaling: a 1024 x 800 JPEG for a 100-px crop of 512 x 400 decodes at 1/4 (the box scaled with it)
    pixels, box = images.decode_for_crop(_jpeg(1024, 800), lambda w, h: (100, 200, 612, 600), 100)
    assert pixels.shape == (200, 256, 3) and box == (25, 50, 153, 150)


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
    out = T.train_pixels(_jpeg(256, 300), 64, same)
    assert out.shape == (3, 64, 64) and out.dtype == torch.uint8


def test_eval_transform_centre_crops_the_short_side():
    img = Image.new("RGB", (300, 100), (0, 0, 0))
    img.paste((255, 255, 255), (100, 0, 200, 100))  # the white centre square is all that should remain
    out = T.eval_transform(img, 50)
    assert out.shape == (50, 50, 3) and out[2:-2, 2:-2].min() == 255


def test_decode_check_fails_exactly_where_decoding_fails():
    from alignclip.data import device_decode

    good = _jpeg(512, 384)
    # extraneous bytes before the end marker: libjpeg warns (strict simplejpeg refuses), PIL decodes it
    at_sos = good.find(b"\xff\xda")
    cases = {"good": good, "extraneous bytes": good[:at_sos] + b"\x00" * 5 + good[at_sos:],
             "truncated": good[: len(good) * 2 // 3], "garbage": b"\xff\xd8\xff" + b"x" * 500, "empty": b""}
    draws = T.crop_draws(np.random.default_rng(0))
    decoders = {"load_rgb": lambda d: images.load_rgb(d, min_size=224), "check_decodable": images.check_decodable,
                "train_pixels": lambda d: T.train_pixels(d, 224, draws),
                "gpu worker": lambda d: device_decode.compressed_crop(d, draws) or T.train_pixels(d, 224, draws)}
    with pytest.raises(ValueError, match="extraneous bytes"):  # so the PIL route of decode_for_crop is what runs
        simplejpeg.decode_jpeg(cases["extraneous bytes"], "RGB")
    for name, data in cases.items():
        verdicts = {}
        for decoder, decode in decoders.items():
            try:
                decode(data)
                verdicts[decoder] = True
            except images.DecodeError:
                verdicts[decoder] = False
        assert set(verdicts.values()) == {name in ("good", "extraneous bytes")}, (name, verdicts)
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
