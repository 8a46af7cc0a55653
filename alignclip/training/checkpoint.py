"""Step checkpoints: complete or absent, a ``latest`` pointer, keep the last K, automatic resume.

Layout (docs/training.md)::

    <run_dir>/checkpoints/
        latest                          one line: the name of the newest complete checkpoint
        step_00001000/
            mp_rank_00_model_states.pt  DeepSpeed engine save (module weights, engine counters)
            *_optim_states.pt           DeepSpeed ZeRO optimizer partitions, one per data-parallel rank
            rng_rank<R>.pt              torch / CUDA / numpy / python RNG states of rank R
            trainer_state.json          TrainerState below (written last: its presence marks completeness)

A run resumed at another world size (``deepspeed.universal_checkpoint=true``) first converts its checkpoint into
DeepSpeed's universal form, ``step_X_universal/`` beside it (rank 0, once), and loads that.

Atomicity: every rank writes into ``step_X.tmp/``; after a barrier rank 0 renames it to ``step_X/`` (a rename is
atomic on POSIX) and then replaces ``latest`` by writing ``latest.tmp`` and renaming it. A crash at any point
leaves either the previous ``latest`` (pointing at a complete directory) or the new one; a stale ``*.tmp`` is
removed by the next save (saves are collective, so none is in progress then). The file system must be shared
by all ranks (as on a Slurm cluster).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

CHECKPOINT_SUBDIR = "checkpoints"
LATEST = "latest"
STATE_FILE = "trainer_state.json"
UNIVERSAL_SUFFIX = "_universal"


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    samples_seen: int = 0  # global samples consumed by those steps
    epoch: int = 0  # the epoch the next batch comes from
    batch_in_epoch: int = 0  # loader batches (per rank) of that epoch already consumed: the data position
    skipped_steps: int = 0  # batches dropped for a non-finite loss (train.nonfinite=skip)
    world_size: int = 1
    accumulation: int = 1  # micro-batches per step: converts batch_in_epoch when the world size changes
    config_hash: str = ""


class CheckpointWorldSizeError(RuntimeError):
    pass


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_SUBDIR


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


# ----------------------------------------------------------------------------------------------------- RNG
def capture_rng() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------------- save
def save_checkpoint(engine, run_dir: str | Path, state: TrainerState, keep: int) -> Path:
    """Collective: every rank calls it at the same step. Returns the final checkpoint directory."""
    root = checkpoints_dir(run_dir)
    name = step_name(state.step)
    tmp, final = root / (name + ".tmp"), root / name
    rank = _rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("step_*.tmp"):  # left by a crash during an earlier save
            shutil.rmtree(stale)
    _barrier()
    engine.save_checkpoint(str(root), tag=tmp.name, save_latest=False)
    torch.save(capture_rng(), tmp / f"rng_rank{rank}.pt")
    _barrier()  # every rank's files are in tmp
    if rank == 0:
        _write_atomic(tmp / STATE_FILE, (json.dumps(asdict(state), indent=2) + "\n").encode())
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again (e.g. preempted right after a periodic save)
            shutil.rmtree(final)
        tmp.rename(final)
        _fsync_dir(root)
        _write_atomic(root / LATEST, (name + "\n").encode())
        _fsync_dir(root)
        prune(root, keep)
    _barrier()
    return final


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")
             and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (``keep`` <= 0 keeps all)."""
    if keep <= 0:
        return
    for old in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- load
def find_latest(run_dir: str | Path) -> Optional[Path]:
    """The checkpoint ``latest`` names, if complete; else the newest complete one; None for a fresh run."""
    root = checkpoints_dir(run_dir)
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if (named / STATE_FILE).is_file():
            return named
    complete = complete_checkpoints(root)
    return complete[-1] if complete else None


def read_state(checkpoint: Path) -> TrainerState:
    return TrainerState(**json.loads((checkpoint / STATE_FILE).read_text()))


def check_world_size(state: TrainerState, checkpoint: Path, world_size: int, universal: bool) -> None:
    """ZeRO partitions the optimizer state by rank: another world size needs a universal checkpoint."""
    if state.world_size == world_size or universal:
        return
    raise CheckpointWorldSizeError(
        f"checkpoint {checkpoint} was written by {state.world_size} ranks, this run has {world_size}. ZeRO "
        f"partitions the optimizer state by rank. Either restart with {state.world_size} ranks "
        f"(train.micro_batch_size keeps the global batch if the memory per device differs), or add "
        f"deepspeed.universal_checkpoint=true: the trainer then converts the checkpoint to DeepSpeed's universal "
        f"form (python -m deepspeed.checkpoint.ds_to_universal, into {checkpoint.name}{UNIVERSAL_SUFFIX}/) and "
        f"resumes from it at the same step; the rest of that epoch is then read in the new ranks' shard split.")


def to_universal(checkpoint: Path) -> Path:
    """Collective: DeepSpeed's universal form of ``checkpoint`` (any world size can load it), converted once by
    rank 0 into ``<name>_universal/`` (complete or absent, like every checkpoint) with the trainer state copied."""
    target = checkpoint.with_name(checkpoint.name + UNIVERSAL_SUFFIX)
    if _rank() == 0 and not (target / STATE_FILE).is_file():
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--inject_missing_state",
               "--input_folder", str(checkpoint), "--output_folder", str(tmp)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"converting {checkpoint} to a universal checkpoint failed ({' '.join(cmd)}):\n"
                               f"{out.stderr[-3000:]}")
        shutil.copy2(checkpoint / STATE_FILE, tmp / STATE_FILE)
        _fsync_dir(tmp)
        tmp.rename(target)
        _fsync_dir(target.parent)
    _barrier()
    return target


def load_checkpoint(engine, checkpoint: Path, world_size: int, universal: bool = False,
                    accumulation: int = 1) -> TrainerState:
    """Restore engine (weights, optimizer, counters) and this rank's RNG; return the trainer state, its data
    position in this run's micro-batches. Another world size goes through a universal checkpoint."""
    state = read_state(checkpoint)
    check_world_size(state, checkpoint, world_size, universal)
    source = checkpoint
    if state.world_size != world_size and not checkpoint.name.endswith(UNIVERSAL_SUFFIX):
        source = to_universal(checkpoint)
    # DeepSpeed reads this flag at load time only: a universal source needs it, a native one must not have it
    engine._config.load_universal_checkpoint = source.name.endswith(UNIVERSAL_SUFFIX)
    path, _ = engine.load_checkpoint(str(source.parent), tag=source.name, load_optimizer_states=True,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {source}")
    rng_file = source / f"rng_rank{_rank()}.pt"
    if state.world_size == world_size and rng_file.is_file():  # other ranks keep their fresh seeds
        restore_rng(torch.load(rng_file, weights_only=False))
    if state.accumulation != accumulation:  # the same number of steps into the epoch
        state.batch_in_epoch = state.batch_in_epoch // state.accumulation * accumulation
    state.accumulation = accumulation
    return state
