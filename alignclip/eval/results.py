"""One JSON per dataset and task, in the CLIP_benchmark layout: {dataset, model, task, metrics, ...}."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


def write_result(out_dir: str | Path, dataset: str, model: str, task: str, metrics: dict[str, float],
                 **extra: Any) -> Path:
    """Write ``<out_dir>/<dataset>_<model>_<task>.json`` and return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{_slug(dataset)}_{_slug(model)}_{_slug(task)}.json"
    record = {"dataset": dataset, "model": model, "task": task, "metrics": metrics, **extra}
    path.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
    return path
