"""Known-answer tests of the gap metrics (alignclip.analysis.metrics)."""

import math

import numpy as np
import pytest
import torch

from alignclip.analysis import metrics as M


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _random_unit(n, d, seed):
    return _unit(np.random.default_rng(seed).normal(size=(n, d)))


def test_identical_modalities_have_no_gap():
    x = _random_unit(200, 16, 0)
    assert M.alignment_score(x, x) == pytest.approx(1.0)
    assert M.centroid_distance(x, x) == pytest.approx(0.0, abs=1e-12)
    assert M.alignment_loss(x, x) == pytest.approx(0.0, abs=1e-12)
    assert M.relative_modality_gap(x, x, "l2") == pytest.approx(0.0, abs=1e-12)
    assert M.relative_modality_gap(x, x, "cosine") == pytest.approx(0.0, abs=1e-12)
    # identical points cannot be told apart: a chance-level classifier
    assert 0.35 <= M.linear_separability(x, x, seed=0) <= 0.65


def test_far_apart_clusters_are_perfectly_separable():
    rng = np.random.default_rng(1)
    img = _unit(np.array([5.0] + [0.0] * 7) + 0.1 * rng.normal(size=(100, 8)))
    txt = _unit(np.array([-5.0] + [0.0] * 7) + 0.1 * rng.normal(size=(100, 8)))
    assert M.linear_separability(img, txt, seed=0) == 1.0
    assert M.centroid_distance(img, txt) == pytest.approx(2.0, abs=0.01)  # antipodal centroids
    assert M.alignment_score(img, txt) == pytest.approx(-1.0, abs=0.01)


def test_centroid_distance_is_not_squared_and_normalises_rows():
    img = np.array([[3.0, 0.0], [5.0, 0.0]])  # both normalise to (1, 0)
    txt = np.array([[0.0, 2.0], [0.0, 7.0]])  # both normalise to (0, 1)
    assert M.centroid_distance(img, txt) == pytest.approx(math.sqrt(2.0))
    assert M.alignment_score(img, txt) == pytest.approx(0.0)


def test_rmg_both_forms_by_hand():
    # two pairs on a circle: x = (1,0),(0,1); y = (0,1),(-1,0) -> every paired cos = 0
    img = np.array([[1.0, 0.0], [0.0, 1.0]])
    txt = np.array([[0.0, 1.0], [-1.0, 0.0]])
    # l2: paired distance sqrt(2); intra: |x1-x2| = sqrt2, |y1-y2| = sqrt2 -> (2*sqrt2 + 2*sqrt2)/(2*2*1) = sqrt2
    assert M.relative_modality_gap(img, txt, "l2") == pytest.approx(0.5)
    # cosine: paired (1-0)/2 = 0.5; intra (1-0)/2 = 0.5 -> 0.5 / (0.5 + 0.5)
    assert M.relative_modality_gap(img, txt, "cosine") == pytest.approx(0.5)
    # make pairs closer than the intra-modal spread: RMG < 0.5 in both forms, and the forms differ
    txt2 = _unit(img + np.array([[0.0, 0.3], [-0.3, 0.0]]))
    l2, cos = M.relative_modality_gap(img, txt2, "l2"), M.relative_modality_gap(img, txt2, "cosine")
    assert 0 < cos < l2 < 0.5
    with pytest.raises(ValueError, match="distance"):
        M.relative_modality_gap(img, txt, "manhattan")


def test_uniformity_and_cross_modal_uniformity_by_hand():
    x = np.array([[1.0, 0.0], [-1.0, 0.0]])  # squared distance 4 between the two
    assert M.uniformity(x) == pytest.approx(-8.0)  # log exp(-2 * 4)
    y = np.array([[0.0, 1.0], [0.0, -1.0]])  # x_i vs y_j (i != j): squared distance 2
    assert M.cross_modal_uniformity(x, y) == pytest.approx(-4.0)
    assert M.alignment_loss(x, y) == pytest.approx(2.0)


def test_torch_and_numpy_inputs_agree_and_give_floats():
    x = _random_unit(64, 8, 2)
    y = _random_unit(64, 8, 3)
    tx = torch.tensor(x, dtype=torch.float32, requires_grad=True)
    ty = torch.tensor(y, dtype=torch.float32)
    for fn in (M.alignment_score, M.centroid_distance, M.alignment_loss, M.cross_modal_uniformity):
        out = fn(tx, ty)
        assert isinstance(out, float)
        assert out == pytest.approx(fn(x, y), abs=1e-5)
    assert M.paired_cosines(tx, ty).shape == (64,)


def test_explained_variance_of_a_planar_cloud():
    rng = np.random.default_rng(4)
    flat = np.zeros((300, 10))
    flat[:, :2] = rng.normal(size=(300, 2))  # lives on a great circle: rank 2 before centring
    ratio = M.explained_variance_ratio(flat)
    assert ratio.sum() == pytest.approx(1.0)
    assert ratio[:2].sum() == pytest.approx(1.0)
    assert M.components_for_variance(flat, 0.99) <= 2


def test_gap_metrics_dict_is_complete():
    x, y = _random_unit(50, 8, 5), _random_unit(50, 8, 6)
    out = M.gap_metrics(x, y)
    assert set(out) >= {"alignment_score", "centroid_distance", "rmg_l2", "rmg_cosine", "linear_separability",
                        "uniformity", "cross_modal_uniformity", "alignment_loss"}
    assert all(isinstance(v, int if k.startswith("pca_") else float) for k, v in out.items())
