"""Measure one trained run: export its checkpoint, encode each evaluation set once, then gap metrics and tasks.

This module is the study's only caller of the export, embedding, gap-analysis and evaluation APIs
(``alignclip.export.export_checkpoint``, ``alignclip.embeddings.encode_with_model`` / ``EmbeddingSet.load``,
``alignclip.analysis.metrics.gap_metrics``, ``alignclip.analysis.gap.analyse_gap``,
``alignclip.eval.suite.evaluate_set``), so a change of those APIs is absorbed here. The embedded default
(``alignclip.run_default``) measures through it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np


@dataclass(frozen=True)
class EvalSet:
    """An image-text set to encode: the model's own generated data ("generated", split val) or shards with a
    tasks JSON (zero-shot classes / templates / labels, as alignclip.embeddings documents)."""

    name: str
    data: str = "generated"
    split: str = "val"
    tasks: str = ""
    limit: int = 0


def export_run(checkpoint: str | Path, out_path: str | Path) -> Path:
    """The checkpoint as one safetensors file (reused when already exported)."""
    from alignclip.export import export_checkpoint

    out_path = Path(out_path)
    if out_path.is_file():
        return out_path
    return export_checkpoint(checkpoint, out_path)


def load_set(cache_dir: str | Path):
    from alignclip.embeddings import EmbeddingSet

    return EmbeddingSet.load(cache_dir)


def encode_set(model_path: str | Path, eval_set: EvalSet, cache_dir: str | Path):
    """The EmbeddingSet of ``eval_set`` under the exported model: read from ``cache_dir`` when encoded before."""
    from alignclip.embeddings import encode_with_model

    cache = Path(cache_dir)
    if (cache / "meta.json").is_file():
        return load_set(cache)
    es = encode_with_model(model_path, data=eval_set.data, split=eval_set.split, tasks_path=eval_set.tasks,
                           limit=eval_set.limit)
    es.save(cache)
    return es


def paired(es) -> tuple[np.ndarray, np.ndarray]:
    """(image of each caption, caption), L2-normalised: the rows every gap metric and plot compares."""
    from alignclip.analysis.metrics import l2_normalize

    img, txt = es.pairs()
    return l2_normalize(img), l2_normalize(txt)


def measure_set(es, seed: int = 0) -> dict:
    """{"gap": every scalar gap metric, "tasks": task -> metrics (retrieval, zero-shot, linear probe, ...)}."""
    from alignclip.analysis.metrics import gap_metrics
    from alignclip.eval.suite import evaluate_set

    return {"gap": gap_metrics(*paired(es), seed=seed), "tasks": evaluate_set(es, seed=seed)}


def gap_plots(sets: Mapping[str, object], out_dir: str | Path, seed: int = 0, title: str = "Modality gap") -> Path:
    """Cosine-CDF, PCA and explained-variance plots + gap_report.md for several models' sets side by side."""
    from alignclip.analysis.gap import analyse_gap

    analyse_gap({name: paired(es) for name, es in sets.items()}, out_dir, seed=seed, title=title)
    return Path(out_dir)
