"""Results in CLIP_benchmark's JSON layout (one file per dataset, model and task) and tables of many of them.

Each JSON holds every field CLIP_benchmark's ``eval`` writes -- ``dataset``, ``model``, ``pretrained``, ``task``,
``metrics``, ``language`` -- so its ``clip_benchmark build`` reads ours next to its own; ours add extra fields
(e.g. ``lam``), which ``build`` carries into its CSV as columns.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
from pathlib import Path
from typing import Any, Iterable

log = logging.getLogger(__name__)
_TOP_K = re.compile(r"^acc(\d+)$")


def finite_metrics(metrics: dict[str, Any], where: str = "") -> tuple[dict[str, Any], dict[str, str]]:
    """(metrics with every NaN / infinity replaced by None, {metric: why it is undefined}), each one warned about.
    JSON has no NaN: ``json.dumps`` would write a bare ``NaN`` that strict readers refuse. CLIP_benchmark reports
    ``acc<k>`` as NaN when the task has fewer than k classes (a one-class folder has no top-5)."""
    clean, undefined = {}, {}
    for name, value in metrics.items():
        if isinstance(value, float) and not math.isfinite(value):
            top_k = _TOP_K.match(name)
            undefined[name] = (f"top-{top_k.group(1)} is undefined: the task has fewer than {top_k.group(1)} classes"
                               if top_k and math.isnan(value) else f"the value is {value} (not finite)")
            log.warning("%s%s: %s; written as null", f"{where}: " if where else "", name, undefined[name])
            value = None
        clean[name] = value
    return clean, undefined


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


def write_result(out_dir: str | Path, dataset: str, model: str, task: str, metrics: dict[str, float],
                 pretrained: str = "", language: str = "en", **extra: Any) -> Path:
    """Write ``<out_dir>/<dataset>_<model>_<task>.json`` and return its path. ``pretrained``: CLIP_benchmark's
    weights tag; ours is the model file (the ``model`` field names the model)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{_slug(dataset)}_{_slug(model)}_{_slug(task)}.json"
    metrics, undefined = finite_metrics(metrics, f"{dataset} {task}")
    record = {"dataset": dataset, "model": model, "pretrained": pretrained, "task": task, "metrics": metrics,
              "language": language, **extra}
    if undefined:
        record["undefined_metrics"] = undefined
    path.write_text(json.dumps(record, indent=2, sort_keys=False, allow_nan=False) + "\n")
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
    if value is None:
        return "undefined"
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
