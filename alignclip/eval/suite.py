"""Every task an EmbeddingSet supports, in one call: retrieval, zero-shot and linear probe per classification
task, and multimodal arithmetic; results keyed by task name (one CLIP_benchmark JSON each via write_results)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from alignclip.embeddings import EmbeddingSet
from alignclip.eval.arithmetic import arithmetic_retrieval
from alignclip.eval.linear_probe import linear_probe
from alignclip.eval.results import write_result
from alignclip.eval.retrieval import retrieval_metrics
from alignclip.eval.zeroshot import zero_shot_classification


def probe_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of the labelled rows into probe-train / probe-test indices."""
    labelled = np.flatnonzero(labels >= 0)
    order = np.random.default_rng(seed).permutation(labelled)
    n_test = max(1, int(round(test_fraction * len(order))))
    return order[n_test:], order[:n_test]


def evaluate_set(es: EmbeddingSet, lam: float = 1.0, seed: int = 0, probe_test_fraction: float = 0.5,
                 linear_probes: bool = True) -> dict[str, dict[str, float]]:
    """task name -> metrics. Linear probes use a seeded split of the set's labelled images (no extra data)."""
    results = {"retrieval": retrieval_metrics(es.image, es.text, es.text_to_image)}
    for name, task in es.zeroshot.items():
        rows = np.flatnonzero(task.labels >= 0)
        if len(rows) == 0:
            continue
        results[f"zeroshot_{name}"] = zero_shot_classification(es.image[rows], task.labels[rows],
                                                               task.class_embeddings)
        train, test = probe_split(task.labels, probe_test_fraction, seed)
        if linear_probes and len(np.unique(task.labels[train])) > 1:
            results[f"linear_probe_{name}"] = linear_probe(es.image[train], task.labels[train], es.image[test],
                                                           task.labels[test], seed=seed)
    if es.arithmetic is not None:
        ar = es.arithmetic
        results["arithmetic"] = arithmetic_retrieval(es.image, ar.source, ar.text_a, ar.text_b, ar.target, lam=lam)
    return results


def write_results(results: dict[str, dict[str, float]], out_dir: str | Path, dataset: str, model: str,
                  **extra) -> list[Path]:
    return [write_result(out_dir, dataset, model, task, metrics, **extra) for task, metrics in results.items()]


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
