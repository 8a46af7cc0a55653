"""Plots of embedding spaces (PNG, matplotlib's Agg backend): paired-cosine CDFs, a 2-D PCA projection of both
modalities with lines between pairs, and cumulative PCA explained variance."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from alignclip.analysis.metrics import explained_variance_ratio, l2_normalize, paired_cosines

Pairs = Mapping[str, tuple]  # model name -> (image embeddings, text embeddings)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_cosine_cdf(pairs: Pairs, path: str | Path) -> Path:
    """Empirical CDF of cos(x_i, y_i) per model: a curve further right means better aligned pairs."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    lowest = 1.0
    for name, (img, txt) in pairs.items():
        cos = np.sort(paired_cosines(img, txt))
        lowest = min(lowest, float(cos[0]))
        ax.plot(cos, np.arange(1, len(cos) + 1) / len(cos), label=name)
    ax.set_xlabel("cosine similarity of paired image and text")
    ax.set_ylabel("fraction of pairs")
    ax.set_xlim(max(-1.0, lowest - 0.05), 1.0)  # zoom on the occupied range
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def pca_projection(img, txt, components: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Both modalities projected on the top principal axes of their union (normalised rows, centred jointly)."""
    a, b = l2_normalize(img), l2_normalize(txt)
    both = np.concatenate([a, b])
    mean = both.mean(axis=0)
    _, _, vt = np.linalg.svd(both - mean, full_matrices=False)
    axes = vt[:components].T
    return (a - mean) @ axes, (b - mean) @ axes


def plot_projection(pairs: Pairs, path: str | Path, max_pairs: int = 300, seed: int = 0) -> Path:
    """One panel per model: images and texts on the joint 2-D PCA plane, a grey line for each pair."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.5 * len(pairs), 4.2), squeeze=False)
    for ax, (name, (img, txt)) in zip(axes[0], pairs.items()):
        p_img, p_txt = pca_projection(img, txt)
        rng = np.random.default_rng(seed)
        shown = rng.choice(len(p_img), size=min(max_pairs, len(p_img)), replace=False)
        for i in shown:
            ax.plot([p_img[i, 0], p_txt[i, 0]], [p_img[i, 1], p_txt[i, 1]], color="0.75", lw=0.4, zorder=1)
        ax.scatter(p_img[shown, 0], p_img[shown, 1], s=6, c="tab:red", label="image", zorder=2)
        ax.scatter(p_txt[shown, 0], p_txt[shown, 1], s=6, c="tab:blue", label="text", zorder=2)
        ax.set_title(name)
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_explained_variance(pairs: Pairs, path: str | Path, max_components: int = 64) -> Path:
    """Cumulative explained variance per model and modality: a slower rise = a more uniformly spread space."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    shown = 10
    for idx, (name, (img, txt)) in enumerate(pairs.items()):
        colour = f"C{idx}"
        for emb, style, modality in ((img, "-", "image"), (txt, "--", "text")):
            cumulative = np.cumsum(explained_variance_ratio(emb))[:max_components]
            shown = max(shown, int(np.searchsorted(cumulative, 0.999)) + 2)  # x range: up to 99.9% everywhere
            ax.plot(np.arange(1, len(cumulative) + 1), cumulative, style, color=colour, label=f"{name} {modality}")
    ax.set_xlim(0.5, min(shown, max_components) + 0.5)
    ax.set_xlabel("principal components")
    ax.set_ylabel("cumulative explained variance")
    ax.set_ylim(0, 1.01)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
