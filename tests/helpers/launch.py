"""What the launch tests submit (``job_overrides``, ``job_env``) and how they read a run directory back."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT
from tests.helpers.tiny import tiny_overrides

SCRIPT_DEFAULT = REPO_ROOT / "configs/experiment/cc12m_alignclip.yaml"  # what slurm/pretrain_alignclip.sh trains
FALLBACKS = ("configs/experiment/embedded_default.yaml",)


def base_config(tmp_dir: Path) -> str:
    """The AlignCLIP experiment file the Slurm script defaults to (our overrides pin the rest); while it does not
    exist yet, the embedded default or an empty file over the schema defaults."""
    for path in (SCRIPT_DEFAULT, *(REPO_ROOT / f for f in FALLBACKS)):
        if path.is_file():
            return str(path)
    empty = Path(tmp_dir) / "base.yaml"
    empty.write_text("name: launch_test\n")
    return str(empty)


def script_config_args(tmp_dir: Path) -> list[str]:
    """Arguments for slurm/pretrain_alignclip.sh: none when its default config exists."""
    config = base_config(tmp_dir)
    return [] if Path(config) == SCRIPT_DEFAULT else ["--config", config]


def job_overrides(cache_dir: Path, run_dir: Path | None = None, **extra) -> list[str]:
    """``tiny_overrides``' AlignCLIP on the generated dataset, pinned against whatever the base experiment file sets
    (it is the CC12M recipe), with the schedule and the ``launch`` settings the launch tests submit."""
    pinned = {
        "model.vision.mlp_ratio": 4.0, "model.text.mlp_ratio": 4.0, "model.grad_checkpointing": False,
        "loss.uniform_weight": 0.0, "loss.xuniform_weight": 0.0, "loss.align_weight": 0.0,
        "data.resampled": False, "data.samples_per_epoch": 0,
        "train.seed": 0, "train.epochs": 30, "train.micro_batch_size": 0, "train.max_steps": 12, "optim.lr": 1e-3,
        "optim.warmup_steps": 2, "optim.min_lr": 0.0, "checkpoint.keep": 2,
        "deepspeed.zero_stage": 1, "logging.tensorboard": True, "logging.gap_batch_size": 16,
        "launch.gpus_per_node": 0, "launch.tasks_per_node": 2, "launch.cpus_per_task": 1,
        "launch.timeout_min": 10, "launch.signal_lead_s": 30, "launch.max_requeues": 3,
    }
    return tiny_overrides(cache_dir, run_dir, alignclip=True, **{**pinned, **extra})


def job_env() -> dict[str, str]:
    """What the tests' jobs inherit (sbatch exports the submitter's environment)."""
    return {"ALIGNCLIP_PYTHON": sys.executable, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
            "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".cache/torch_extensions"))}


def trainer_state(run_dir: Path) -> dict:
    """The newest complete checkpoint's trainer state ({} when there is none)."""
    latest = Path(run_dir) / "checkpoints" / "latest"
    if not latest.is_file():
        return {}
    return json.loads((latest.parent / latest.read_text().strip() / "trainer_state.json").read_text())


def final_weights(run_dir: Path) -> dict:
    import torch

    latest = Path(run_dir) / "checkpoints" / "latest"
    path = latest.parent / latest.read_text().strip() / "mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=False)["module"]


def max_weight_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def logged_steps(run_dir: Path, tag: str = "loss/total") -> list[int]:
    """Steps at which TensorBoard holds ``tag`` (every event file of the run, restarts included)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps: list[int] = []
    for events in sorted((Path(run_dir) / "tb").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            steps += [e.step for e in acc.Scalars(tag)]
    return sorted(steps)


def unavailable(reason: str):
    """Skip with the reason, but fail under CI (CI=true), where these tests must run."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but: {reason}", pytrace=False)
    pytest.skip(reason)
