"""Multimodal arithmetic: query = image + lambda (text_b - text_a), then retrieve the target image
(Fahim, Murphy & Fyshe 2024, arXiv 2405.18570, section 5.3; SIMAT, Couairon et al. 2021)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from alignclip.analysis.metrics import as_numpy, l2_normalize


def arithmetic_queries(source_images, text_a, text_b, lam: float = 1.0) -> np.ndarray:
    """q = normalise(x_src) + lambda (normalise(t_b) - normalise(t_a)), renormalised (one row per query)."""
    q = l2_normalize(source_images) + lam * (l2_normalize(text_b) - l2_normalize(text_a))
    return l2_normalize(q)


def _ranked_gallery(queries, gallery, exclude: Sequence[int] | None) -> np.ndarray:
    sims = l2_normalize(queries) @ l2_normalize(gallery).T
    if exclude is not None:  # never return the source image itself
        sims[np.arange(len(sims)), np.asarray(exclude)] = -np.inf
    return np.argsort(-sims, axis=1)


def arithmetic_retrieval(gallery_images, source_index: Sequence[int], text_a, text_b, target_index: Sequence[int],
                         lam: float = 1.0, ks: Sequence[int] = (1, 5), exclude_source: bool = True) -> dict[str, float]:
    """Recall@K of the ground-truth target image for each query gallery[source] + lambda (t_b - t_a)."""
    gallery = as_numpy(gallery_images)
    src = np.asarray(source_index, dtype=np.int64)
    queries = arithmetic_queries(gallery[src], text_a, text_b, lam)
    order = _ranked_gallery(queries, gallery, src if exclude_source else None)
    target = np.asarray(target_index, dtype=np.int64)
    rank = np.argmax(order == target[:, None], axis=1)
    out = {f"arithmetic_recall@{k}": float(np.mean(rank < k)) for k in ks}
    out["arithmetic_mean_rank"] = float(np.mean(rank) + 1)
    return out


def simat_score(gallery_images, source_index: Sequence[int], text_a, text_b, relevance, lam: float = 1.0,
                threshold: float = 0.5) -> float:
    """SIMAT-style score (percent): the share of queries whose retrieved image (source excluded) is relevant to
    the query's target text, i.e. ``relevance[query, retrieved] > threshold``. SIMAT ships such relevance
    scores (OSCAR image-caption scores); pass them as a [queries, gallery] array."""
    gallery = as_numpy(gallery_images)
    src = np.asarray(source_index, dtype=np.int64)
    order = _ranked_gallery(arithmetic_queries(gallery[src], text_a, text_b, lam), gallery, src)
    rel = np.asarray(relevance, dtype=np.float64)
    if rel.shape != (len(src), len(gallery)):
        raise ValueError(f"relevance must be [queries, gallery] = {(len(src), len(gallery))}, found {rel.shape}")
    retrieved = order[:, 0]
    return float(100.0 * np.mean(rel[np.arange(len(src)), retrieved] > threshold))
