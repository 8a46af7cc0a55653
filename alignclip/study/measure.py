"""Measure one trained run: export its checkpoint, encode each evaluation set once, then gap metrics and tasks.

This module is the study's only caller of the export, embedding, gap-analysis and evaluation APIs
(``alignclip.export.export_checkpoint``, ``alignclip.embeddings.encode_with_model`` / ``EmbeddingSet.load``,
``alignclip.analysis.metrics.gap_metrics``, ``alignclip.analysis.gap.analyse_gap``,
``alignclip.eval.suite.evaluate_set``), so a change of those APIs is absorbed here. The embedded default
(``alignclip.run_default``) measures through it too.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping

import numpy as np


@dataclass(frozen=True)
class EvalSet:
    """An image-text set to encode: the model's own generated data ("generated", split val) or shards with a
    tasks JSON (zero-shot classes / templates / labels, as alignclip.embeddings documents) or the same ground
    truth as plain files (``classnames``, ``templates``, ``labels``: alignclip.embeddings.tasks_from_files).

    ``probe_split``: the split of the same generated data that linear probes fit on ("train"), scored on this
    set as CLIP_benchmark does; "" runs no probe."""

    name: str
    data: str = "generated"
    split: str = "val"
    tasks: str = ""
    limit: int = 0
    probe_split: str = ""
    classnames: str = ""
    templates: str = ""
    labels: str = ""

    def probe_set(self) -> "EvalSet | None":
        """The set the linear probes fit on: the generated ``probe_split``, with that split's own labels."""
        if not self.probe_split:
            return None
        return replace(self, name=f"{self.name}-probe", split=self.probe_split, tasks="", limit=0, probe_split="")


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


def _cached(cache: Path) -> bool:
    return (cache / "meta.json").is_file()  # written last by EmbeddingSet.save


def encode_set(model_path: str | Path, eval_set: EvalSet, cache_dir: str | Path):
    """The EmbeddingSet of ``eval_set`` under the exported model: read from ``cache_dir`` when encoded before."""
    from alignclip.embeddings import encode_with_model

    cache = Path(cache_dir)
    if _cached(cache):
        return load_set(cache)
    es = encode_with_model(model_path, data=eval_set.data, split=eval_set.split, tasks_path=eval_set.tasks,
                           limit=eval_set.limit, extra_tasks=file_tasks(eval_set))
    es.save(cache)
    return es


def file_tasks(eval_set: EvalSet) -> dict | None:
    """The zero-shot task of the set's classnames / templates / labels files (None without them); labels keyed by
    a source file name are re-keyed to the shards' sample keys (``tasks_from_files``)."""
    if not eval_set.labels:
        return None
    from alignclip.embeddings import tasks_from_files

    return tasks_from_files(eval_set.classnames, eval_set.templates, eval_set.labels, data=eval_set.data)


def encode_with_probe(model_path: str | Path, eval_set: EvalSet, cache_dir: str | Path) -> tuple:
    """(the EmbeddingSet of ``eval_set``, the one its linear probes fit on or None), each encoded once: the probe
    set (each train image once, with its first caption) is cached beside it, in ``<cache_dir>-probe``."""
    from alignclip.data.generated import train_images
    from alignclip.export import read_config

    es = encode_set(model_path, eval_set, cache_dir)
    probe, cache = eval_set.probe_set(), Path(f"{cache_dir}-probe")
    if probe is None:
        return es, None
    if not _cached(cache):
        # the probe fits on each image once, and the split's leading samples hold every image once: encoding only
        # them halves the work with two captions per image (v2, v3)
        probe = replace(probe, limit=train_images(read_config(model_path).data))
    return es, encode_set(model_path, probe, cache)


def paired(es) -> tuple[np.ndarray, np.ndarray]:
    """(image of each caption, caption), L2-normalised: the rows every gap metric and plot compares."""
    from alignclip.analysis.metrics import l2_normalize

    img, txt = es.pairs()
    return l2_normalize(img), l2_normalize(txt)


def measure_set(es, seed: int = 0, train=None) -> dict:
    """{"gap": every scalar gap metric, "tasks": task -> metrics (retrieval, zero-shot, arithmetic, and a linear
    probe per classification task when ``train``, a set of the train split with the same tasks, is given)}."""
    from alignclip.analysis.metrics import gap_metrics
    from alignclip.eval.suite import evaluate_set

    return {"gap": gap_metrics(*paired(es), seed=seed), "tasks": evaluate_set(es, seed=seed, train=train),
            "counts": set_counts(es)}


def set_counts(es) -> dict:
    """What one figure of the set rests on: pairs and images measured, and per zero-shot task the labelled images
    and the majority-class rate (the top-1 of always guessing the most frequent class)."""
    out = {"pairs": int(len(es.text)), "images": int(len(es.image))}
    for name, task in es.zeroshot.items():
        labels = task.labels[task.labels >= 0]
        if len(labels):
            out[f"zeroshot_{name}/labelled"] = int(len(labels))
            out[f"zeroshot_{name}/majority_rate"] = float(np.bincount(labels).max() / len(labels))
    return out


def gap_plots(sets: Mapping[str, object], out_dir: str | Path, seed: int = 0, title: str = "Modality gap") -> Path:
    """Cosine-CDF, PCA and explained-variance plots + gap_report.md for several models' sets side by side."""
    from alignclip.analysis.gap import analyse_gap

    analyse_gap({name: paired(es) for name, es in sets.items()}, out_dir, seed=seed, title=title)
    return Path(out_dir)
