"""Global-batch semantics across ranks: two gloo processes vs one process on the same concatenated batch.

Gradient convention pinned here (alignclip.distributed.gather): each rank's loss averages over ranks to the global
loss; a rank's feature gradients are W x the global-batch gradient of its slice (the gather backward sums over
ranks), which DeepSpeed's averaging of parameter gradients turns back into the global gradient; the logit-scale
gradient of a rank averages over ranks to the global one.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from alignclip.config import LossConfig
from alignclip.losses import build_objective

from tests.helpers.ranks import run_on_ranks

GLOBAL_BATCH, DIM, SEMANTIC_DIM, WORLD = 8, 6, 5, 2

CASES = {
    "clip": dict(clip_weight=1.0),
    "alignclip_image": dict(clip_weight=0.0, crsep_weight=1.0, imsep_weight=0.5, imsep_sides="image"),
    "alignclip_text": dict(clip_weight=0.0, crsep_weight=1.0, imsep_weight=0.5, imsep_sides="text"),
    "alignclip_both": dict(clip_weight=0.0, crsep_weight=1.0, imsep_weight=0.5, imsep_sides="both"),
    "alignclip_no_rescale": dict(clip_weight=0.0, crsep_weight=1.0, imsep_weight=0.5, imsep_rescale=False),
    "uniform": dict(clip_weight=0.0, uniform_weight=1.0),
    "xuniform": dict(clip_weight=0.0, xuniform_weight=1.0),
    "align": dict(clip_weight=0.0, align_weight=1.0),
    "cuaxu": dict(clip_weight=1.0, uniform_weight=1.0, xuniform_weight=1.0, align_weight=1.0),
}


def global_batch(dtype):
    g = torch.Generator().manual_seed(1234)
    image = F.normalize(torch.randn(GLOBAL_BATCH, DIM, generator=g, dtype=torch.float64), dim=1)
    text = F.normalize(torch.randn(GLOBAL_BATCH, DIM, generator=g, dtype=torch.float64), dim=1)
    semantic = torch.randn(GLOBAL_BATCH, SEMANTIC_DIM, generator=g, dtype=torch.float64)
    return image.to(dtype), text.to(dtype), semantic.to(dtype), torch.tensor(2.3, dtype=dtype)


def loss_and_grads(rank, world, case, dtype):
    """This rank's total, terms and gradients (local E_v, E_t slices and the logit scale)."""
    image, text, semantic, scale = global_batch(dtype)
    n = GLOBAL_BATCH // world
    rows = slice(rank * n, (rank + 1) * n)
    image, text = image[rows].clone().requires_grad_(True), text[rows].clone().requires_grad_(True)
    scale = scale.clone().requires_grad_(True)
    out = build_objective(LossConfig(impl="dense", **CASES[case]))(image, text, scale, semantic[rows])
    out.total.backward()
    return dict(total=out.total.detach(), terms=out.terms, image_grad=image.grad, text_grad=text.grad,
                scale_grad=scale.grad if scale.grad is not None else torch.zeros((), dtype=dtype))


def every_case_on_this_rank(rank, world):
    results = {(case, str(dtype)): loss_and_grads(rank, world, case, dtype)
               for case in CASES for dtype in (torch.float32, torch.float64)}
    results["primitives"] = gather_primitives(rank, world)
    return results


def gather_primitives(rank, world):
    from alignclip.distributed.gather import (all_gather_no_grad, all_gather_with_grad, all_reduce_sum_with_grad,
                                              rank_and_world)

    x = torch.full((2, 3), float(rank + 1), requires_grad=True)
    gathered = all_gather_with_grad(x)
    # rank r weights the gathered rows by (r + 1): the slice gradient of every rank is the sum 1 + 2 = 3
    (gathered * (rank + 1)).sum().backward()
    y = torch.tensor(float(rank + 1), requires_grad=True)
    reduced = all_reduce_sum_with_grad(y)
    (reduced * (rank + 1)).backward()
    sem = all_gather_no_grad(torch.full((1, 2), float(rank), requires_grad=True))
    return dict(rank_world=rank_and_world(), gathered=gathered.detach(), x_grad=x.grad, reduced=reduced.detach(),
                y_grad=y.grad, sem=sem, sem_requires_grad=sem.requires_grad)


@pytest.fixture(scope="module")
def two_ranks():
    return run_on_ranks(every_case_on_this_rank, WORLD)


@pytest.mark.heavy
def test_gather_primitives_sum_gradients_over_ranks(two_ranks):
    for rank, result in enumerate(two_ranks):
        p = result["primitives"]
        assert p["rank_world"] == (rank, WORLD)
        assert torch.equal(p["gathered"], torch.tensor([[1.0] * 3] * 2 + [[2.0] * 3] * 2))
        assert torch.equal(p["x_grad"], torch.full((2, 3), 3.0))
        assert p["reduced"].item() == 3.0 and p["y_grad"].item() == 3.0
        assert torch.equal(p["sem"], torch.tensor([[0.0, 0.0], [1.0, 1.0]])) and not p["sem_requires_grad"]


@pytest.mark.heavy
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_equal_one_process_on_the_global_batch(two_ranks, case, dtype):
    # fp32: 1e-6 relative to max(1, |reference|) (a logit-scale gradient of ~10 has an ulp of ~1e-6);
    # fp64: 1e-12, i.e. the same computation up to summation order.
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    single = loss_and_grads(0, 1, case, dtype)  # no process group here: the single-process loss
    ranks = [r[(case, str(dtype))] for r in two_ranks]

    def close(got, want):
        return bool((got - want).abs().max() <= tol * max(1.0, want.abs().max().item()))

    # value: the average of the per-rank totals (and of each term) is the global-batch loss
    assert close(sum(r["total"] for r in ranks) / WORLD, single["total"])
    for name, value in single["terms"].items():
        assert close(sum(r["terms"][name] for r in ranks) / WORLD, value), name
    # features: each rank's gradient of its slice is W x the global gradient of that slice
    for key in ("image_grad", "text_grad"):
        assert close(torch.cat([r[key] for r in ranks]) / WORLD, single[key]), key
    # logit scale: the average over ranks is the global gradient
    assert close(sum(r["scale_grad"] for r in ranks) / WORLD, single["scale_grad"])
    if "uniform" in case:  # the log of a global mean: the same value on every rank (not a mean of logs)
        assert close(ranks[0]["total"], ranks[1]["total"])


def test_mean_of_per_rank_logs_would_differ():
    """Guard that the uniformity case above is discriminating: averaging per-rank U's is another number."""
    from alignclip.losses import dense

    image, _, _, _ = global_batch(torch.float64)
    full = dense.uniformity(image, image, 0).item()
    halves = [dense.uniformity(image[o:o + 4], image, o).item() for o in (0, 4)]
    assert abs(sum(halves) / 2 - full) > 1e-4
