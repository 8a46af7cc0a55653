"""Post-hoc, closed-form maps that move image embeddings toward the text embeddings (the aligner's baselines).

Each baseline is fitted on paired arrays (row i of the images goes with row i of the texts) and maps new
embeddings with ``map_image`` / ``map_text``. All three are affine, x -> (x - shift) @ rotation + offset, which
``AffineMap`` stores; the outputs are not renormalised (metrics and evaluation normalise rows themselves).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from alignclip.analysis.metrics import as_numpy


@dataclass
class AffineMap:
    """x -> (x - shift) @ rotation + offset; rotation None means the identity."""

    shift: np.ndarray
    offset: np.ndarray
    rotation: np.ndarray | None = None

    def __call__(self, x) -> np.ndarray:
        y = as_numpy(x) - self.shift
        if self.rotation is not None:
            y = y @ self.rotation
        return y + self.offset

    @classmethod
    def identity(cls, dim: int) -> "AffineMap":
        return cls(np.zeros(dim), np.zeros(dim))


class PostHocAligner:
    """A fitted pair of maps (image side, text side) with the aligner's interface."""

    name = "identity"

    def __init__(self) -> None:
        self.image_map: AffineMap | None = None
        self.text_map: AffineMap | None = None

    def fit(self, img, txt) -> "PostHocAligner":
        x, y = as_numpy(img), as_numpy(txt)
        if x.shape != y.shape:
            raise ValueError(f"{self.name}: paired arrays must match, found {x.shape} and {y.shape}")
        self.image_map, self.text_map = self._fit(x, y)
        return self

    def _fit(self, x: np.ndarray, y: np.ndarray) -> tuple[AffineMap, AffineMap]:
        return AffineMap.identity(x.shape[1]), AffineMap.identity(x.shape[1])

    def _check(self) -> None:
        if self.image_map is None:
            raise RuntimeError(f"{self.name}: call fit(image, text) before mapping embeddings")

    def map_image(self, img) -> np.ndarray:
        self._check()
        return self.image_map(img)

    def map_text(self, txt) -> np.ndarray:
        self._check()
        return self.text_map(txt)


class MeanShift(PostHocAligner):
    """Liang et al. (2022): translate the images along the gap vector, x -> x - (mean(x) - mean(y))."""

    name = "mean_shift"

    def _fit(self, x, y):
        gap = x.mean(axis=0) - y.mean(axis=0)
        return AffineMap(shift=gap, offset=np.zeros_like(gap)), AffineMap.identity(x.shape[1])


class MeanCentering(PostHocAligner):
    """Centre each modality on its own mean (as C3 / I0T do): x -> x - mean(x), y -> y - mean(y)."""

    name = "mean_centering"

    def _fit(self, x, y):
        zeros = np.zeros(x.shape[1])
        return AffineMap(shift=x.mean(axis=0), offset=zeros), AffineMap(shift=y.mean(axis=0), offset=zeros)


class CenteredProcrustes(PostHocAligner):
    """Centred orthogonal Procrustes: R = argmin_{R^T R = I} ||(X - mu_x) R - (Y - mu_y)||_F = U V^T,
    where U S V^T = svd((X - mu_x)^T (Y - mu_y)); images map to (x - mu_x) R + mu_y, texts stay."""

    name = "procrustes"

    def _fit(self, x, y):
        mu_x, mu_y = x.mean(axis=0), y.mean(axis=0)
        u, _, vt = np.linalg.svd((x - mu_x).T @ (y - mu_y))
        return AffineMap(shift=mu_x, offset=mu_y, rotation=u @ vt), AffineMap.identity(x.shape[1])


BASELINES = {cls.name: cls for cls in (PostHocAligner, MeanShift, MeanCentering, CenteredProcrustes)}


def build_baseline(name: str) -> PostHocAligner:
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; expected one of {sorted(BASELINES)}")
    return BASELINES[name]()
