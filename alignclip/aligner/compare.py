"""Fit every method (identity, the post-hoc baselines, MLP aligners) on one embedding set and report, for each,
gap metrics AND task metrics on another: closing the gap alone is trivial (centring drives L2M to ~0); what
matters is what the map does to zero-shot, retrieval and arithmetic."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

from alignclip.analysis.metrics import gap_metrics
from alignclip.analysis.report import markdown_table, write_markdown
from alignclip.embeddings import EmbeddingSet
from alignclip.eval.suite import evaluate_set, headline

GAP_COLUMNS = ["alignment_score", "centroid_distance", "rmg_cosine", "linear_separability"]


def compare_methods(methods: Mapping[str, object], eval_set: EmbeddingSet, lam: float = 1.0,
                    seed: int = 0, train_set: EmbeddingSet | None = None) -> dict[str, dict]:
    """methods: name -> fitted object with map_image / map_text (numpy in, numpy out).
    Returns name -> {"gap": gap metrics, "tasks": task metrics} on ``eval_set`` after the map (linear probes
    fitted on ``train_set`` after the same map, when given)."""
    rows = {}
    for name, method in methods.items():
        mapped = eval_set.mapped(method.map_image, method.map_text, name)
        train = train_set.mapped(method.map_image, method.map_text, name) if train_set is not None else None
        rows[name] = {"gap": gap_metrics(*mapped.pairs(), seed=seed),
                      "tasks": evaluate_set(mapped, lam, seed, train=train)}
    return rows


def comparison_table(rows: Mapping[str, dict]) -> str:
    table = {name: {**{c: r["gap"][c] for c in GAP_COLUMNS}, **headline(r["tasks"])} for name, r in rows.items()}
    return markdown_table(table, first_header="method")


def write_comparison(rows: Mapping[str, dict], out_dir: str | Path, title: str, notes: str = "") -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "aligner_comparison.json").write_text(json.dumps(rows, indent=2) + "\n")
    return write_markdown(out / "aligner_report.md", title,
                          [("Gap and task metrics after each map (held-out set)", comparison_table(rows)),
                           *([("Notes", notes)] if notes else [])])
