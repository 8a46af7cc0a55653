"""A run folder's checkpoints as files: their layout, the manifest that verifies them, and reading them back.

Layout (docs/training.md)::

    <run_dir>/checkpoints/
        latest                          one line: the name of the newest complete checkpoint
        step_00001000/
            mp_rank_00_model_states.pt  DeepSpeed engine save (module weights, engine counters)
            *_optim_states.pt           DeepSpeed ZeRO optimizer partitions, one per data-parallel rank
            rng_state_rank<R>.pt        torch / CUDA / numpy / python RNG states of rank R, plain tensors and
                                        numbers only (loads with ``torch.load(weights_only=True)``)
            trainer_state.json          TrainerState below (JSON)
            config.yaml                 the resolved config this checkpoint was trained with (the resume
                                        checks compare it with the new one: alignclip.training.plan)
            manifest.json               size and SHA-256 of every other file (written last)

Verification: ``manifest.json`` lists every file of the checkpoint with its size and SHA-256; it is written last
and atomically. ``checkpoint_problem`` is the one check every reader makes before it uses a checkpoint (the
trainer's resume, export, and the tools that read a run folder through export); ``newest_verified`` walks a run's
checkpoints in resume's order. Hashing streams each file in 8 MiB chunks and is split over the ranks when a
process group is up (file i is hashed by rank i mod world).

Writing, resuming into an engine, RNG states and DeepSpeed's universal form live with the trainer
(``alignclip.training.checkpoint``); this module needs neither DeepSpeed nor a model, so tools that only read a
run folder stay below the trainer.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from alignclip.config import ConfigError
from alignclip.distributed.process import rank, world_size
from alignclip.fs import atomic_write

CHECKPOINT_SUBDIR = "checkpoints"
LATEST = "latest"
STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"
CONFIG_FILE = "config.yaml"  # the config the checkpoint trained with (alignclip.training.parts.Checkpointer)
LEGACY_RNG = "rng_rank{rank}.pt"  # pickled RNG states of checkpoints written before manifests existed
RNG_FILE = "rng_state_rank{rank}.pt"
_HASH_CHUNK = 8 << 20


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
    # optim.text_lr_scale of the run: it decides the optimizer's group layout. None in checkpoints written before it
    # was recorded (trained_text_lr_scale then asks the run's config.yaml)
    text_lr_scale: Optional[float] = None


class CheckpointError(ConfigError):
    """No usable checkpoint in a run directory that has some: the run's input is broken, exit 2 like a config
    error (``python -m alignclip.train`` maps ConfigError to exit 2)."""

    kind, listing = "checkpoint error", True


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_SUBDIR


# ------------------------------------------------------------------------------------------------ manifest
def file_digest(path: Path) -> str:
    """SHA-256 of a file, streamed in chunks (ZeRO partitions can be many GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files_of(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def _shared_digests(folder: Path, names: list[str]) -> dict[str, str]:
    """Digests of ``names`` under ``folder``; file i is hashed by rank i mod world and the results are gathered
    (collective when the world has > 1 rank)."""
    mine = {n: file_digest(folder / n) for n in names[rank()::world_size()]}
    if world_size() == 1:
        return mine
    gathered: list = [None] * world_size()
    dist.all_gather_object(gathered, mine)
    return {k: v for part in gathered for k, v in part.items()}


def write_manifest(folder: Path) -> None:
    """Collective: size and SHA-256 of every file in ``folder`` into ``folder/manifest.json`` (rank 0, atomic)."""
    names = _files_of(folder)
    digests = _shared_digests(folder, names)
    if rank() == 0:
        files = {n: {"size": (folder / n).stat().st_size, "sha256": digests[n]} for n in names}
        atomic_write(folder / MANIFEST, json.dumps({"algorithm": "sha256", "files": files}, indent=1) + "\n")


def verify_manifest(checkpoint: Path) -> Optional[str]:
    """Collective: None if every file matches ``manifest.json``, else what failed (naming the file). A
    checkpoint written before manifests existed has none: accepted (None), its load still has to succeed."""
    manifest_path = checkpoint / MANIFEST
    if not manifest_path.is_file():
        if any(checkpoint.glob(RNG_FILE.format(rank="*"))):  # written since manifests exist: it lost its manifest
            return f"{manifest_path}: missing"
        return None
    try:
        expected = json.loads(manifest_path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{manifest_path}: unreadable manifest ({err})"
    present = set(_files_of(checkpoint))
    for name in sorted(set(expected) - present):
        return f"{checkpoint / name}: listed in the manifest but missing"
    for name in sorted(present - set(expected)):
        return f"{checkpoint / name}: not listed in the manifest"
    for name in sorted(expected):
        size = (checkpoint / name).stat().st_size
        if size != expected[name]["size"]:
            return f"{checkpoint / name}: {size} bytes, the manifest says {expected[name]['size']}"
    digests = _shared_digests(checkpoint, sorted(expected))
    for name in sorted(expected):
        if digests[name] != expected[name]["sha256"]:
            return f"{checkpoint / name}: SHA-256 differs from the manifest (the bytes changed after the save)"
    return None


# ------------------------------------------------------------------------------------------------- reading
def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")
             and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def find_latest(run_dir: str | Path) -> Optional[Path]:
    """The checkpoint ``latest`` names, if complete; else the newest complete one; None for a fresh run."""
    root = checkpoints_dir(run_dir)
    ordered = candidates(root)
    readable = [c for c in ordered if _peek_state(c) is not None]
    return readable[0] if readable else None


def candidates(root: Path) -> list[Path]:
    """Complete checkpoints, newest first, the one ``latest`` names leading."""
    ordered = complete_checkpoints(root)[::-1]
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if named in ordered:
            ordered.remove(named)
            ordered.insert(0, named)
    return ordered


def read_state(checkpoint: Path) -> TrainerState:
    path = checkpoint / STATE_FILE
    try:
        return TrainerState(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: unreadable trainer state ({type(err).__name__}: {err})") from None


def _peek_state(checkpoint: Path) -> Optional[TrainerState]:
    try:
        return read_state(checkpoint)
    except CheckpointError:
        return None


def checkpoint_problem(checkpoint: Path) -> Optional[str]:
    """None when ``checkpoint`` passes what ``resume`` checks before it loads (every file against the manifest,
    then a readable trainer state), else what failed, naming the file. Read-only."""
    problem = verify_manifest(checkpoint)
    if problem is None:
        try:
            read_state(checkpoint)
        except CheckpointError as err:
            problem = str(err)
    return problem


def newest_verified(run_dir: str | Path, warn=None) -> Path:
    """Read-only, for tools that read a run folder (export, and evaluation / gap analysis through it): the newest
    checkpoint that verifies, in ``resume``'s order (``latest`` first, then newest first); each damaged newer one
    is named through ``warn``, as ``resume`` does. ``FileNotFoundError`` when the run has no checkpoint,
    ``CheckpointError`` (exit 2) naming each one when none verifies. Nothing is removed or written."""
    warn = warn or print_warning
    root = checkpoints_dir(run_dir)
    ordered = candidates(root)
    if not ordered:
        raise FileNotFoundError(f"no complete checkpoint under {run_dir}: expected {root}/step_XXXXXXXX "
                                f"directories (with {STATE_FILE})")
    failures = []
    for checkpoint in ordered:
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            if failures:
                warn(f"WARNING: reading {checkpoint}, an OLDER checkpoint, because {len(failures)} newer one(s) "
                     f"failed verification: " + "; ".join(failures))
            return checkpoint
        failures.append(problem)
    raise CheckpointError(f"no checkpoint in {root} verifies ({len(ordered)} tried): " + "; ".join(failures))


def print_warning(message: str) -> None:
    print(f"[checkpoint] {message}", file=sys.stderr, flush=True)
