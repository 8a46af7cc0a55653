"""A study's post-hoc variants: a map fitted on one run's embeddings of a fit set, then applied to its evaluation
sets. The closed-form maps are alignclip.aligner.baselines (mean shift, Liang et al. 2022; centring; centred
Procrustes); ``mlp`` is the distilled aligner (alignclip.aligner.train; Vu, Balashova & Tran 2024) with its
defaults, seeded by the run's seed. A fitted map is saved beside the variant's figures, so a rerun reuses it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from alignclip.aligner.baselines import AffineMap, PostHocAligner, build_baseline


def fit_map(kind: str, fit_set, seed: int):
    """A fitted object with ``map_image`` / ``map_text`` (numpy in, numpy out) on ``fit_set``'s (image, caption)
    pairs, L2-normalised as every cache holds them."""
    img, txt = fit_set.pairs()
    if kind == "mlp":
        from alignclip.aligner.train import AlignerTraining, train_aligner

        aligner, _ = train_aligner(img, txt, settings=AlignerTraining(seed=seed))
        return aligner
    return build_baseline(kind).fit(img, txt)


def save_map(method, path: Path):
    """Write ``method`` to ``path`` (a folder) and return it; the MLP as the aligner's safetensors file, an affine
    map as its arrays."""
    from alignclip.aligner.mlp import MLPAligner, save_aligner

    path.mkdir(parents=True, exist_ok=True)
    if isinstance(method, MLPAligner):
        save_aligner(method, path / "aligner.safetensors")
    else:
        arrays = {}
        for side, affine in (("image", method.image_map), ("text", method.text_map)):
            arrays[f"{side}_shift"], arrays[f"{side}_offset"] = affine.shift, affine.offset
            if affine.rotation is not None:
                arrays[f"{side}_rotation"] = affine.rotation
        np.savez(path / "affine.npz", **arrays)
    (path / "map.json").write_text(json.dumps({"kind": getattr(method, "name", "mlp")}) + "\n")  # written last
    return method


def load_map(path: Path):
    """The map ``save_map`` wrote to ``path``, or None when there is none (yet)."""
    if not (path / "map.json").is_file():
        return None
    if (path / "aligner.safetensors").is_file():
        from alignclip.aligner.mlp import load_aligner

        return load_aligner(path / "aligner.safetensors")
    with np.load(path / "affine.npz", allow_pickle=False) as arrays:
        method = PostHocAligner()
        method.name = json.loads((path / "map.json").read_text())["kind"]
        method.image_map, method.text_map = (
            AffineMap(arrays[f"{side}_shift"], arrays[f"{side}_offset"],
                      arrays[f"{side}_rotation"] if f"{side}_rotation" in arrays else None)
            for side in ("image", "text"))
    return method
