"""Shared test set-up: offline hubs, DeepSpeed on its CPU accelerator, one OpenMP thread per process.

The helpers live in the ``tests.helpers`` package; the ``heavy`` and ``slurm`` markers are registered in
pyproject.toml (``make test-fast`` deselects ``heavy``).
"""

from __future__ import annotations

import os

from tests.helpers import REPO_ROOT

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".cache" / "torch_extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
