"""Loss-kernel fixtures: unit-norm batches, all terms with their gradients, the comparison against the dense
oracle (``alignclip.losses.dense``) at fp32 relative error <= ``REL_TOL``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from alignclip.losses import dense

REL_TOL = 1e-5
TERM_WEIGHTS = (1.0, 0.7, 0.5, 0.3)  # distinct weights so every term's gradient is checked, not just their sum


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (0 when both are exactly 0)."""
    diff = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    return diff / scale if scale > 0 else diff


def make_batch(n: int, d: int = 32, k: int = 24, seed: int = 0, anti_aligned: bool = False):
    """Unit-norm E_v, E_t, E_s. ``anti_aligned``: every image is ~u and every text ~-u, so all cross-modal cosines
    are ~-1 and all intra-modal ones ~+1 (the logits sit at the ends of s [-2, 2])."""
    gen = torch.Generator().manual_seed(seed)
    image, text = torch.randn(n, d, generator=gen), torch.randn(n, d, generator=gen)
    if anti_aligned:
        u = torch.randn(d, generator=gen)
        u = u / u.norm()
        image, text = u + 1e-3 * image, -u + 1e-3 * text
    semantic = F.normalize(torch.randn(n, k, generator=gen), dim=-1)
    return F.normalize(image, dim=-1), F.normalize(text, dim=-1), semantic


def run_terms(impl, image, text, semantic, scale, *, offset=0, n_local=None, shared=True, sides=("image", "text"),
              rescale=True):
    """Weighted sum of all terms and its gradients w.r.t. the global leaves. ``shared``: the single-process call
    (``*_local is *_all``); otherwise rows [offset, offset + n_local) of the batch against all of it."""
    image, text = image.clone().requires_grad_(), text.clone().requires_grad_()
    logit_scale = torch.tensor(math.log(scale), requires_grad=True)
    if shared:
        image_local, text_local, sem_local = image, text, semantic
    else:
        rows = slice(offset, offset + n_local)
        image_local, text_local, sem_local = image[rows], text[rows], semantic[rows]
    terms = impl(image_local, text_local, image, text, sem_local, semantic, logit_scale, offset,
                 cross_modal=True, imsep_sides=sides, imsep_rescale=rescale)
    values = torch.stack([t for t in terms if t is not None])
    total = sum(w * t for w, t in zip(TERM_WEIGHTS, terms) if t is not None)
    total.backward()
    return values.detach(), image.grad, text.grad, logit_scale.grad


def assert_matches_dense(impl, *args, **kwargs):
    expected = run_terms(dense.contrastive_terms, *args, **kwargs)
    actual = run_terms(impl, *args, **kwargs)
    for name, a, e in zip(("values", "d_image", "d_text", "d_logit_scale"), actual, expected):
        assert torch.isfinite(a).all(), f"{name} has inf/nan"
        err = relative_error(a, e)
        assert err <= REL_TOL, f"{name}: relative error {err:.2e} > {REL_TOL}"
