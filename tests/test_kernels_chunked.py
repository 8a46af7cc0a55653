"""The chunked CLIP + IMSep implementation equals the dense oracle (alignclip.losses.dense): values and gradients,
fp32, relative error <= 1e-5, single process and in the gathered layout (rows of one rank, two real ranks)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from alignclip.config import LossConfig
from alignclip.distributed.gather import all_gather_no_grad, all_gather_with_grad
from alignclip.losses import build_objective, chunked, dense
from tests.helpers.kernels import (REL_TOL, TERM_WEIGHTS, assert_matches_dense, make_batch, relative_error,
                                   run_terms)
from tests.helpers.ranks import run_on_ranks


def chunked_impl(chunk_size):
    def impl(*args, **kwargs):
        return chunked.contrastive_terms(*args, chunk_size=chunk_size, **kwargs)
    return impl


@pytest.mark.parametrize("n", [1, 7, 64, 200, 256])
@pytest.mark.parametrize("scale", [1.0, 14.3, 100.0])
def test_chunked_single_process_matches_dense(n, scale):
    image, text, semantic = make_batch(n, seed=n)
    # chunk 48: ragged last tiles for 7 (one tile), 64, 200 and 256 (several)
    assert_matches_dense(chunked_impl(48), image, text, semantic, scale)


@pytest.mark.parametrize("n", [1, 7, 64, 200, 256])
@pytest.mark.parametrize("scale", [1.0, 14.3, 100.0])
def test_chunked_gathered_rows_match_dense(n, scale):
    """Rows of one 'rank' (the second half of a 2n batch, offset n) against all columns: the generic path."""
    image, text, semantic = make_batch(2 * n, seed=100 + n)
    assert_matches_dense(chunked_impl(48), image, text, semantic, scale, offset=n, n_local=n, shared=False)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("sides", [("image",), ("text",), ("image", "text")])
def test_chunked_imsep_sides_with_and_without_rescaling(shared, sides):
    image, text, semantic = make_batch(90, seed=7)
    for rescale in (True, False):
        assert_matches_dense(chunked_impl(32), image, text, semantic, 14.3, offset=0, n_local=90, shared=shared,
                             sides=sides, rescale=rescale)


@pytest.mark.parametrize("shared", [True, False])
def test_chunked_anti_aligned_rows_stay_finite(shared):
    """Cosines all near -1 (and intra-modal near +1, D up to 2): logits near -s and 2s, s = 100."""
    image, text, semantic = make_batch(70, seed=3, anti_aligned=True)
    assert (image @ text.T).max() < -0.99
    assert_matches_dense(chunked_impl(16), image, text, semantic, 100.0, offset=0, n_local=70, shared=shared)


def test_chunked_negative_semantic_similarities():
    """S with strongly negative entries (D up to ~2): half the captions are the negation of the other half."""
    image, text, semantic = make_batch(64, seed=5)
    semantic = torch.cat([semantic[:32], -semantic[:32] + 0.05 * semantic[32:]])
    semantic = F.normalize(semantic, dim=-1)
    assert (semantic @ semantic.T).min() < -0.9
    for shared in (True, False):
        assert_matches_dense(chunked_impl(24), image, text, semantic, 100.0, offset=0, n_local=64, shared=shared)


def test_chunk_size_does_not_change_the_result():
    image, text, semantic = make_batch(50, seed=9)
    reference = run_terms(chunked_impl(50), image, text, semantic, 14.3)
    for chunk in (1, 7, 64):
        for a, e in zip(run_terms(chunked_impl(chunk), image, text, semantic, 14.3), reference):
            assert relative_error(a, e) <= REL_TOL


def test_chunked_rejects_bad_chunk_size():
    image, text, semantic = make_batch(4)
    with pytest.raises(ValueError, match="chunk_size"):
        run_terms(chunked_impl(0), image, text, semantic, 1.0)


def test_objective_chunked_impl_matches_dense_impl():
    """The wiring: loss.impl=chunked through build_objective gives dense's total and gradients."""
    image, text, semantic = make_batch(40, seed=11)
    results = {}
    for impl in ("dense", "chunked"):
        cfg = LossConfig(impl=impl, clip_weight=1.0, crsep_weight=0.0, imsep_weight=0.5, imsep_sides="both",
                         chunk_size=16)
        v, t = image.clone().requires_grad_(), text.clone().requires_grad_()
        logit_scale = torch.tensor(2.659, requires_grad=True)
        out = build_objective(cfg)(v, t, logit_scale, semantic)
        out.total.backward()
        results[impl] = (out.total.detach(), v.grad, t.grad, logit_scale.grad)
    for a, e in zip(results["chunked"], results["dense"]):
        assert relative_error(a, e) <= REL_TOL


# ----------------------------------------------------------------------------------------- two real ranks
def _rank_terms(rank, world_size, use_chunked):
    image, text, semantic = make_batch(2 * 37, seed=21)  # same global batch on every rank
    n = image.shape[0] // world_size
    rows = slice(rank * n, (rank + 1) * n)
    image_local = image[rows].clone().requires_grad_()
    text_local = text[rows].clone().requires_grad_()
    logit_scale = torch.tensor(math.log(50.0), requires_grad=True)
    image_all, text_all = all_gather_with_grad(image_local), all_gather_with_grad(text_local)
    semantic_all = all_gather_no_grad(semantic[rows])
    impl = chunked_impl(16) if use_chunked else dense.contrastive_terms
    terms = impl(image_local, text_local, image_all, text_all, semantic[rows], semantic_all, logit_scale,
                 rank * n, cross_modal=True, imsep_sides=("image", "text"), imsep_rescale=True)
    total = sum(w * t for w, t in zip(TERM_WEIGHTS, terms))
    total.backward()
    return torch.stack(list(terms)).detach(), image_local.grad, text_local.grad, logit_scale.grad


def _rank_entry(rank, world_size):
    return _rank_terms(rank, world_size, True), _rank_terms(rank, world_size, False)


@pytest.mark.heavy
def test_chunked_two_ranks_match_dense_and_the_global_batch():
    results = run_on_ranks(_rank_entry, 2)
    for chunked_result, dense_result in results:
        for a, e in zip(chunked_result, dense_result):
            assert relative_error(a, e) <= REL_TOL
    # The average over ranks is the single-process loss of the concatenated batch.
    image, text, semantic = make_batch(2 * 37, seed=21)
    values, *_ = run_terms(dense.contrastive_terms, image, text, semantic, 50.0)
    mean_over_ranks = (results[0][0][0] + results[1][0][0]) / 2
    assert relative_error(mean_over_ranks, values) <= REL_TOL
    # Feature gradients: rank r's slice, summed over ranks by the gather, is W x the global-batch gradient.
    _, d_image, d_text, _ = run_terms(dense.contrastive_terms, image, text, semantic, 50.0)
    assert relative_error(torch.cat([results[0][0][1], results[1][0][1]]), 2 * d_image) <= REL_TOL
    assert relative_error(torch.cat([results[0][0][2], results[1][0][2]]), 2 * d_text) <= REL_TOL


def test_auto_on_cpu_is_dense_within_one_tile_and_chunked_above():
    """loss.impl=auto off CUDA: bitwise the dense result while the global batch fits one tile, the chunked above."""
    cfg = dict(clip_weight=1.0, imsep_weight=0.5, imsep_sides="image", chunk_size=16)
    for n, twin in ((16, "dense"), (17, "chunked")):
        image, text, semantic = make_batch(n, seed=n)
        totals = {}
        for impl in ("auto", twin):
            logit_scale = torch.tensor(2.659)
            totals[impl] = build_objective(LossConfig(impl=impl, **cfg))(image, text, logit_scale, semantic).total
        assert torch.equal(totals["auto"], totals[twin]), (n, twin)


@pytest.mark.parametrize("shared", [True, False])
def test_chunked_bf16_inputs_match_the_fp32_dense_oracle_to_bf16_rounding(shared):
    """bf16 features (a direct caller's choice; the objective itself hands fp32): the single-process backward used
    to fail mixing its fp32 accumulators with bf16 operands. Against the dense loss of the same rounded inputs."""
    image, text, semantic = make_batch(100, seed=11)
    image, text = image.bfloat16(), text.bfloat16()
    expected = run_terms(dense.contrastive_terms, image.float(), text.float(), semantic, 14.3, offset=0,
                         n_local=100, shared=shared)
    actual = run_terms(chunked_impl(32), image, text, semantic, 14.3, offset=0, n_local=100, shared=shared)
    for name, a, e in zip(("values", "d_image", "d_text", "d_logit_scale"), actual, expected):
        assert torch.isfinite(a).all(), name
        assert relative_error(a.float(), e) < 2e-2, name
