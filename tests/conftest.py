"""Shared test set-up: offline hubs, DeepSpeed on its CPU accelerator, one OpenMP thread per process.

The helpers live in the ``tests.helpers`` package; the ``heavy`` and ``slurm`` markers are registered in
pyproject.toml (``make test-fast`` deselects ``heavy``).

``make test`` runs the suite on three pytest-xdist workers, one test file per worker at a time (``--dist loadfile``:
a module's fixtures, such as its Slurm cluster or its trained runs, are built once). The files that take longest
are handed out first, so the workers end together instead of one finishing with the Slurm file alone.
"""

from __future__ import annotations

import os
import sys

from tests.helpers import REPO_ROOT

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".cache" / "torch_extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# trust_remote_code copies an export's modeling file here, not into ~/.cache/huggingface (per xdist worker: below)
os.environ.setdefault("HF_MODULES_CACHE", str(REPO_ROOT / ".cache" / "hf_modules" / "main"))
os.environ.setdefault("OMP_NUM_THREADS", "1")


# Files that take longest, longest first (measured on 2 cores; the rest keep their order after them). Only the
# order changes: every test still runs, and a file missing from this list is simply scheduled later.
LONGEST_FIRST = (
    "test_launch_slurm", "test_chaos", "test_study_own_data", "test_study_e2e", "test_faults_data",
    "test_faults_counts", "test_faults_run_folder", "test_interop_init", "test_interop_cb", "test_plan", "test_train_distributed", "test_faults_checkpoint",
    "test_faults_preemption", "test_tools_metrics", "test_data_remote", "test_launch_api", "test_train_step",
    "test_packaging", "test_tools_export", "test_run_default", "test_faults_eval_preemption", "test_perf_bench_step",
    "test_gpu_check", "test_tools_eval", "test_train_resume_config", "test_losses_clamp", "test_perf_race",
    "test_kernels_bench", "test_models", "test_tools_cli", "test_data_mixing",
)


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    order = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda item: (rank.get(item.path.stem, len(rank)), order[id(item)]))


def pytest_configure(config):
    """Each xdist worker its own HF_MODULES_CACHE (transformers reads it when first imported, which no worker has
    done yet here), so that two workers never write one module file at once."""
    worker = getattr(config, "workerinput", {}).get("workerid")
    if worker is not None and "transformers" not in sys.modules:
        os.environ["HF_MODULES_CACHE"] = str(REPO_ROOT / ".cache" / "hf_modules" / worker)
