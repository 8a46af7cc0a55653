"""Results in CLIP_benchmark's JSON layout (one file per dataset, model and task) and tables of many of them.

Each JSON holds every field CLIP_benchmark's ``eval`` writes -- ``dataset``, ``model``, ``pretrained``, ``task``,
``metrics``, ``language`` -- so its ``clip_benchmark build`` reads ours next to its own; ours add extra fields
(e.g. ``lam``), which ``build`` carries into its CSV as columns.
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import Any, Iterable


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


def write_result(out_dir: str | Path, dataset: str, model: str, task: str, metrics: dict[str, float],
                 pretrained: str = "", language: str = "en", **extra: Any) -> Path:
    """Write ``<out_dir>/<dataset>_<model>_<task>.json`` and return its path. ``pretrained``: CLIP_benchmark's
    weights tag; ours is the model file (the ``model`` field names the model)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{_slug(dataset)}_{_slug(model)}_{_slug(task)}.json"
    record = {"dataset": dataset, "model": model, "pretrained": pretrained, "task": task, "metrics": metrics,
              "language": language, **extra}
    path.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
    return path


def read_results(paths: Iterable[str | Path]) -> list[dict]:
    """Every result JSON among ``paths`` (files, or folders whose *.json are read)."""
    records = []
    for p in map(Path, paths):
        files = sorted(p.glob("*.json")) if p.is_dir() else [p]
        for f in files:
            record = json.loads(f.read_text())
            if not isinstance(record, dict) or not {"dataset", "model", "task", "metrics"} <= set(record):
                raise ValueError(f"{f}: not a result JSON (expected keys dataset, model, task, metrics)")
            records.append(record)
    return records


def result_rows(records: list[dict]) -> tuple[list[str], list[dict]]:
    """One row per (dataset, model, task) with every metric as a column; the column names in first-seen order."""
    columns = ["dataset", "model", "pretrained", "task"]
    rows = []
    for r in records:
        row = {c: r.get(c, "") for c in columns[:4]}
        for key, value in r["metrics"].items():
            if key not in columns:
                columns.append(key)
            row[key] = value
        rows.append(row)
    return columns, rows


def _cell(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def write_tables(records: list[dict], out_dir: str | Path, stem: str = "results") -> tuple[Path, Path]:
    """``<stem>.csv`` and ``<stem>.md``: every result, metrics as columns."""
    columns, rows = result_rows(records)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / f"{stem}.csv", out / f"{stem}.md"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path
