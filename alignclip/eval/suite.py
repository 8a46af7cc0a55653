"""Every task an EmbeddingSet supports, in one call: retrieval, zero-shot and linear probe per classification
task, and multimodal arithmetic; results keyed by task name (one CLIP_benchmark JSON each via write_results).

Linear probes train on a separate train set (CLIP_benchmark: fit on the train split, score on the test split);
without one they are not run, never fitted on part of the evaluation set."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from alignclip.embeddings import EmbeddingSet
from alignclip.eval.arithmetic import arithmetic_retrieval
from alignclip.eval.linear_probe import linear_probe
from alignclip.eval.results import write_result
from alignclip.eval.retrieval import retrieval_metrics
from alignclip.eval.zeroshot import zero_shot_classification


def evaluate_set(es: EmbeddingSet, lam: float = 1.0, seed: int = 0, train: EmbeddingSet | None = None,
                 ) -> dict[str, dict[str, float]]:
    """task name -> metrics. ``train``: a set encoded from the train split with the same tasks' labels; each
    classification task with labels there gets a linear probe fitted on it and scored on ``es``."""
    results = {"retrieval": retrieval_metrics(es.image, es.text, es.text_to_image)}
    for name, task in es.zeroshot.items():
        rows = np.flatnonzero(task.labels >= 0)
        if len(rows) == 0:
            continue
        results[f"zeroshot_{name}"] = zero_shot_classification(es.image[rows], task.labels[rows],
                                                               task.class_embeddings)
        train_task = train.zeroshot.get(name) if train is not None else None
        if train_task is not None:
            fit = np.flatnonzero(train_task.labels >= 0)
            if len(np.unique(train_task.labels[fit])) > 1:
                results[f"linear_probe_{name}"] = linear_probe(train.image[fit], train_task.labels[fit],
                                                               es.image[rows], task.labels[rows], seed=seed)
    if es.arithmetic is not None:
        ar = es.arithmetic
        results["arithmetic"] = arithmetic_retrieval(es.image, ar.source, ar.text_a, ar.text_b, ar.target, lam=lam)
    return results


def write_results(results: dict[str, dict[str, float]], out_dir: str | Path, dataset: str, model: str,
                  **extra) -> list[Path]:
    return [write_result(out_dir, dataset, model, task_name(task), metrics, **extra)
            for task, metrics in results.items()]


def task_name(task: str) -> str:
    """CLIP_benchmark's task names for ours (``zeroshot_shape`` -> ``zeroshot_classification_shape``)."""
    if task == "retrieval":
        return "zeroshot_retrieval"
    if task.startswith("zeroshot_"):
        return "zeroshot_classification" + task[len("zeroshot"):]
    return task


def headline(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """A few columns for comparison tables: R@1 both ways, zero-shot top-1 per task, arithmetic R@1."""
    out = {}
    if "retrieval" in results:
        out["I->T R@1"] = results["retrieval"]["text_retrieval_recall@1"]
        out["T->I R@1"] = results["retrieval"]["image_retrieval_recall@1"]
    for task, metrics in results.items():
        if task.startswith("zeroshot_"):
            out[f"zs {task[9:]} top1"] = metrics["acc1"]
        if task.startswith("linear_probe_"):
            out[f"probe {task[13:]} top1"] = metrics["acc1"]
    if "arithmetic" in results:
        out["arith R@1"] = results["arithmetic"]["arithmetic_recall@1"]
    return out
