"""Modality-gap metrics: the project's one metrics module (docs/analysis.md gives every formula).

Every function takes two paired sets of embeddings (row i of ``img`` is paired with row i of ``txt``) as torch
tensors or numpy arrays, L2-normalises the rows first (so the figures are about directions on the unit sphere,
whatever the caller passes), and returns a Python float (or a numpy array where said). The trainer calls
``alignment_score`` and ``centroid_distance`` on a fixed held-out batch for live gap metrics.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Pairwise sums over N x N distances run in row blocks of this many rows, bounding memory to ~block * N floats.
_PAIRWISE_BLOCK_ROWS = 1024


def as_numpy(x: Any) -> np.ndarray:
    """A float64 2-D array from a torch tensor (any device, grad or not) or an array-like."""
    if hasattr(x, "detach"):  # torch.Tensor without importing torch here
        x = x.detach().float().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"expected embeddings of shape [n, d], found shape {arr.shape}")
    return arr


def l2_normalize(x: Any) -> np.ndarray:
    """Rows scaled to unit L2 norm (a zero row stays zero)."""
    arr = as_numpy(x)
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    return arr / np.maximum(norms, 1e-12)


def _paired(img: Any, txt: Any) -> tuple[np.ndarray, np.ndarray]:
    a, b = l2_normalize(img), l2_normalize(txt)
    if a.shape != b.shape:
        raise ValueError(f"paired embeddings must have equal shapes, found image {a.shape} and text {b.shape}")
    return a, b


def paired_cosines(img: Any, txt: Any) -> np.ndarray:
    """cos(x_i, y_i) for every pair i: a numpy array of shape [n]."""
    a, b = _paired(img, txt)
    return np.sum(a * b, axis=1)


def alignment_score(img: Any, txt: Any) -> float:
    """Alignment = 1/N sum_i cos(x_i, y_i) (Vu, Balashova & Tran 2024): 1 when every pair coincides."""
    return float(paired_cosines(img, txt).mean())


def centroid_distance(img: Any, txt: Any) -> float:
    """L2M = ||mean_i x_i - mean_i y_i||_2 on normalised rows, NOT squared (Vu, Balashova & Tran 2024;
    Liang et al. 2022)."""
    a, b = _paired(img, txt)
    return float(np.linalg.norm(a.mean(axis=0) - b.mean(axis=0)))


def gap_vector(img: Any, txt: Any) -> np.ndarray:
    """Delta_gap = mean_i x_i - mean_i y_i (image centroid minus text centroid), on normalised rows."""
    a, b = _paired(img, txt)
    return a.mean(axis=0) - b.mean(axis=0)


def _sq_dists(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """||u_i - v_j||^2 for unit rows: 2 - 2 u_i.v_j (clipped at 0 against rounding)."""
    return np.maximum(2.0 - 2.0 * (u @ v.T), 0.0)


def _offdiag_sum(u: np.ndarray, v: np.ndarray, fn) -> float:
    """sum_{i != j} fn(squared distance(u_i, v_j)), blockwise over rows."""
    total = 0.0
    n = u.shape[0]
    for start in range(0, n, _PAIRWISE_BLOCK_ROWS):
        stop = min(start + _PAIRWISE_BLOCK_ROWS, n)
        vals = fn(_sq_dists(u[start:stop], v))
        rows = np.arange(stop - start)
        vals[rows, start + rows] = 0.0  # drop the i == j terms
        total += float(vals.sum())
    return total


def _pair_distance(sq: np.ndarray, distance: str) -> np.ndarray:
    if distance == "l2":
        return np.sqrt(sq)
    if distance == "cosine":
        return sq / 4.0  # (1 - cos)/2 = ||u - v||^2 / 4 for unit vectors
    raise ValueError(f"distance must be 'l2' or 'cosine', found {distance!r}")


def relative_modality_gap(img: Any, txt: Any, distance: str = "l2") -> float:
    """RMG = m / (m + (sum_{i!=j} d(x_i,x_j) + sum_{i!=j} d(y_i,y_j)) / (2N(N-1))), m = 1/N sum_i d(x_i, y_i).

    distance="l2":     d(u, v) = ||u - v||_2, the plain L2 of Vu, Balashova & Tran 2024.
    distance="cosine": d(u, v) = (1 - cos(u, v)) / 2 in [0, 1], the form of its origin (Schrodi et al. 2025).
    Both on normalised rows; needs N >= 2.
    """
    a, b = _paired(img, txt)
    n = a.shape[0]
    if n < 2:
        raise ValueError(f"RMG needs at least 2 pairs, found {n}")
    paired = float(_pair_distance(np.sum((a - b) ** 2, axis=1), distance).mean())
    intra = (_offdiag_sum(a, a, lambda s: _pair_distance(s, distance))
             + _offdiag_sum(b, b, lambda s: _pair_distance(s, distance))) / (2.0 * n * (n - 1))
    denom = paired + intra
    return float(paired / denom) if denom > 0 else 0.0


def uniformity(x: Any) -> float:
    """U(X) = log 1/(N(N-1)) sum_{i != j} exp(-2 ||x_i - x_j||^2) (Fahim, Murphy & Fyshe 2024, arXiv 2405.18570,
    eq. 2; i != j as in the training loss)."""
    a = l2_normalize(x)
    return _log_mean_offdiag_gaussian(a, a, "uniformity needs at least 2 embeddings")


def cross_modal_uniformity(img: Any, txt: Any) -> float:
    """L_xuniform = log 1/(N(N-1)) sum_{i != j} exp(-2 ||x_i - y_j||^2) (Fahim, Murphy & Fyshe 2024,
    arXiv 2405.18570, eq. 4)."""
    a, b = _paired(img, txt)
    return _log_mean_offdiag_gaussian(a, b, "cross-modal uniformity needs at least 2 pairs")


def _log_mean_offdiag_gaussian(a: np.ndarray, b: np.ndarray, too_few: str) -> float:
    """log 1/(N(N-1)) sum_{i != j} exp(-2 ||a_i - b_j||^2), the kernel of both uniformities."""
    n = a.shape[0]
    if n < 2:
        raise ValueError(f"{too_few}, found {n}")
    return float(np.log(_offdiag_sum(a, b, lambda s: np.exp(-2.0 * s)) / (n * (n - 1))))


def alignment_loss(img: Any, txt: Any) -> float:
    """L_align = 1/N sum_i ||x_i - y_i||^2 = 2 - 2 * alignment_score (Fahim, Murphy & Fyshe 2024,
    arXiv 2405.18570, eq. 5)."""
    a, b = _paired(img, txt)
    return float(np.mean(np.sum((a - b) ** 2, axis=1)))


def linear_separability(img: Any, txt: Any, seed: int = 0, test_fraction: float = 0.2) -> float:
    """Held-out accuracy of a logistic regression telling image from text embeddings (Fahim, Murphy & Fyshe
    2024, arXiv 2405.18570; Welle 2023).

    The 2N embeddings (label 1 = image, 0 = text) are split by a seeded random permutation into 80% train / 20%
    test; ~0.5 means the modalities overlap, 1.0 means they are linearly disjoint.
    """
    from sklearn.linear_model import LogisticRegression

    a, b = _paired(img, txt)
    features = np.concatenate([a, b])
    labels = np.concatenate([np.ones(len(a)), np.zeros(len(b))])
    order = np.random.default_rng(seed).permutation(len(features))
    n_test = max(1, int(round(test_fraction * len(features))))
    test, train = order[:n_test], order[n_test:]
    if len(np.unique(labels[train])) < 2:
        raise ValueError("linear separability needs both modalities in the training split; pass more pairs")
    clf = LogisticRegression(max_iter=2000, C=1.0)
    clf.fit(features[train], labels[train])
    return float(clf.score(features[test], labels[test]))


def explained_variance_ratio(x: Any) -> np.ndarray:
    """PCA explained-variance ratio of each principal component (descending) of the normalised, centred rows."""
    a = l2_normalize(x)
    centred = a - a.mean(axis=0, keepdims=True)
    singular = np.linalg.svd(centred, compute_uv=False)
    var = singular ** 2
    total = var.sum()
    return var / total if total > 0 else var


def components_for_variance(x: Any, fraction: float = 0.9) -> int:
    """The fewest principal components whose cumulative explained variance reaches ``fraction``."""
    cumulative = np.cumsum(explained_variance_ratio(x))
    return int(min(np.searchsorted(cumulative, fraction - 1e-12) + 1, len(cumulative)))


def gap_metrics(img: Any, txt: Any, seed: int = 0) -> dict[str, float]:
    """Every scalar gap metric of this module on one paired set, as a flat dict (floats; PCA counts are ints)."""
    return {
        "alignment_score": alignment_score(img, txt),
        "centroid_distance": centroid_distance(img, txt),
        "rmg_l2": relative_modality_gap(img, txt, "l2"),
        "rmg_cosine": relative_modality_gap(img, txt, "cosine"),
        "linear_separability": linear_separability(img, txt, seed=seed),
        "uniformity_image": uniformity(img),
        "uniformity_text": uniformity(txt),
        "uniformity": 0.5 * (uniformity(img) + uniformity(txt)),
        "cross_modal_uniformity": cross_modal_uniformity(img, txt),
        "alignment_loss": alignment_loss(img, txt),
        "pca_components_90_image": components_for_variance(img, 0.9),
        "pca_components_90_text": components_for_variance(txt, 0.9),
    }
