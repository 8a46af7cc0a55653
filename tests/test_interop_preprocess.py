"""One preprocessing: our evaluation transform is OpenCLIP's (resize the short side, bicubic, centre crop, same
rounding) on real-looking non-square, tiny, huge and transparent images; HF's PIL backend differs only by its
floored crop offset. Pixels and the exported models' embeddings are compared through each library's own
preprocess."""

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

SIZE = 64
# (width, height): non-square both ways (393 x 600 as in a real held-out set), one whose crop offset is 1.5 (HF
# floors it to 1, torchvision rounds it to 2), tiny, 1 px wide, huge (12 MP), square
SIZES = [(600, 393), (393, 600), (67, 64), (64, 71), (5, 3), (1, 9), (4096, 2731), (64, 64)]


def hf_shifted(img: Image.Image, size: int = SIZE) -> bool:
    """Whether HF's floored crop offset differs from torchvision's rounded one: (resized long side - size) is 3
    modulo 4 (at 64 px: 67 x 64, 64 x 71, and the 4096 x 2731 picture, resized to 95 x 64)."""
    from alignclip.data.transforms import shortest_edge_size

    return (max(shortest_edge_size(img.width, img.height, size)) - size) % 4 == 3


def photo(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    """A JPEG-decoded picture: a gradient sky, a few blurred shapes, sensor noise (RGBA: a PNG with a soft alpha
    edge and a fully transparent corner whose hidden colour is black, as image editors store it)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    base = np.stack([120 + 100 * yy / max(height, 1), 90 + 80 * xx / max(width, 1), 200 - 60 * yy / max(height, 1)],
                    -1)
    img = Image.fromarray(np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = rng.integers(0, max(width, 2)), rng.integers(0, max(height, 2))
        x1, y1 = x0 + rng.integers(1, max(width // 2, 2)), y0 + rng.integers(1, max(height // 2, 2))
        draw.ellipse((x0, y0, x1, y1), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    img = img.filter(ImageFilter.GaussianBlur(1.2))
    out = io.BytesIO()
    if mode == "RGBA":
        alpha = np.clip(255 * (xx / max(width - 1, 1)) * 1.6, 0, 255).astype(np.uint8)
        rgba = np.dstack([np.asarray(img), alpha])
        rgba[alpha == 0, :3] = 0
        Image.fromarray(rgba, "RGBA").save(out, format="PNG")
    else:
        img.save(out, format="JPEG", quality=88)
    out.seek(0)
    return Image.open(out)


def real_looking_cases() -> list[tuple[str, Image.Image]]:
    """(name, picture): non-square both ways, tiny, 1 px wide, huge, square, and a transparent PNG."""
    cases = [(f"{w}x{h}", photo(w, h, i)) for i, (w, h) in enumerate(SIZES)]
    return cases + [("transparent 300x200", photo(300, 200, 99, "RGBA"))]


def perturbed_tiny_clip(seed: int = 0):
    """(model, config): the tiny CLIP (64 px, patch stem) with every parameter moved off its initial value."""
    from alignclip.config import load_config
    from alignclip.models import build_model

    config = load_config("model/clip_tiny")
    torch.manual_seed(seed)
    model = build_model(config.model).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, config


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The perturbed tiny CLIP exported to OpenCLIP and HF folders."""
    from alignclip.export import save_hf, save_openclip

    root = tmp_path_factory.mktemp("exported")
    model, config = perturbed_tiny_clip()
    return model, save_openclip(model, config, root / "oc"), save_hf(model, config, root / "hf")


def _cases():
    cases = real_looking_cases()
    assert [hf_shifted(img) for _, img in cases].count(True) == 3
    return cases


def _floored_crop(img: Image.Image, size: int = SIZE) -> torch.Tensor:
    """HF's PIL backend: the same resize, the crop offset floored."""
    from alignclip.data.transforms import normalize_batch, shortest_edge_size

    w, h = shortest_edge_size(img.width, img.height, size)
    resized = img.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    return normalize_batch([np.asarray(resized.crop((left, top, left + size, top + size)))])[0]


def worst_through_own_preprocess(model, oc_dir, hf_dir, size: int, cases) -> dict[str, float]:
    """The largest difference, over ``cases``, between our pixels / image embeddings and those of the OpenCLIP and
    HF exports loaded by their libraries, each through its own preprocess (HF's PIL backend; where its floored crop
    offset moves the crop, our model is run on HF's pixels: that is HF's crop, not the export, differing)."""
    import open_clip
    from transformers import AutoImageProcessor, AutoModel

    from alignclip.data.images import to_rgb
    from alignclip.data.transforms import ImageTransform

    oc_model, _, oc_preprocess = open_clip.create_model_and_transforms(f"local-dir:{oc_dir}")
    oc_model.eval()
    hf_model = AutoModel.from_pretrained(str(hf_dir), trust_remote_code=True).eval()  # CLIP, or ours
    hf_pil = AutoImageProcessor.from_pretrained(str(hf_dir), backend="pil")
    ours = ImageTransform(size)
    worst = {"openclip pixels": 0.0, "hf pixels": 0.0, "openclip embeddings": 0.0, "hf embeddings": 0.0}
    for name, img in cases:
        theirs_input = to_rgb(img)  # the libraries drop alpha; ours composites on white (ImageTransform's doc)
        pixels = ours(img)
        oc_pixels = oc_preprocess(theirs_input)
        hf_pixels = torch.from_numpy(np.asarray(hf_pil(theirs_input, return_tensors="np")["pixel_values"][0]))
        worst["openclip pixels"] = max(worst["openclip pixels"], float((oc_pixels - pixels).abs().max()))
        expected_hf = _floored_crop(to_rgb(img), size) if hf_shifted(img, size) else pixels
        torch.testing.assert_close(hf_pixels, expected_hf, atol=1e-6, rtol=0, msg=name)
        worst["hf pixels"] = max(worst["hf pixels"], float((hf_pixels - expected_hf).abs().max()))
        with torch.no_grad():
            embedding = model.encode_image(pixels[None])
            oc_embedding = oc_model.encode_image(oc_pixels[None])
            hf_embedding = hf_model.get_image_features(pixel_values=hf_pixels[None])
            hf_embedding = getattr(hf_embedding, "pooler_output", hf_embedding)
            expected = model.encode_image(expected_hf[None])
        worst["openclip embeddings"] = max(worst["openclip embeddings"],
                                           float((oc_embedding - embedding).abs().max()))
        worst["hf embeddings"] = max(worst["hf embeddings"], float((hf_embedding - expected).abs().max()))
    return worst


def test_pixels_and_embeddings_equal_through_each_librarys_own_preprocess(exported):
    model, oc_dir, hf_dir = exported
    worst = worst_through_own_preprocess(model, oc_dir, hf_dir, SIZE, _cases())
    print(worst)
    assert worst["openclip pixels"] <= 1e-6 and worst["hf pixels"] <= 1e-6
    assert worst["openclip embeddings"] <= 1e-5 and worst["hf embeddings"] <= 1e-5


def test_where_the_libraries_differ_is_measured(exported):
    """The documented differences, measured: HF's one-pixel crop shift, its torchvision backend, and the libraries'
    dropping of alpha (ours composites on white)."""
    import open_clip
    from transformers import AutoImageProcessor

    from alignclip.data.transforms import ImageTransform

    _, oc_dir, hf_dir = exported
    _, _, oc_preprocess = open_clip.create_model_and_transforms(f"local-dir:{oc_dir}")
    hf_tv = AutoImageProcessor.from_pretrained(str(hf_dir), backend="torchvision")
    hf_pil = AutoImageProcessor.from_pretrained(str(hf_dir), backend="pil")
    ours = ImageTransform(SIZE)
    shifted = photo(67, 64, 2)
    pil = torch.from_numpy(np.asarray(hf_pil(shifted, return_tensors="np")["pixel_values"][0]))
    assert float((pil - ours(shifted)).abs().max()) > 1e-2  # one column over
    tv_gap = max(float((hf_tv(img, return_tensors="pt")["pixel_values"][0] - ours(img)).abs().max())
                 for name, img in _cases() if "transparent" not in name and not hf_shifted(img))
    transparent = photo(300, 200, 99, "RGBA")
    alpha_gap = float((oc_preprocess(transparent) - ours(transparent)).abs().max())
    print(f"HF torchvision backend vs ours: {tv_gap:.2e}; alpha dropped vs composited on white: {alpha_gap:.2e}")
    assert tv_gap > 1e-6 and alpha_gap > 1.0
