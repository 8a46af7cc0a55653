"""Step checkpoints of a training run: complete or absent, a ``latest`` pointer, keep the last K, automatic
resume. The folder's layout, the manifest and reading a checkpoint back (verified) are ``alignclip.checkpoints``;
this module writes them from an engine and loads them into one.

A run resumed at another world size (``deepspeed.universal_checkpoint=true``) first converts its checkpoint into
DeepSpeed's universal form, ``step_X_universal/`` beside it (rank 0, once), and loads that.

Verification: a resume checks each checkpoint as every reader does (``alignclip.checkpoints.checkpoint_problem``:
the manifest, then the trainer state) before it loads it. ``resume`` walks the complete checkpoints newest first: a
missing/extra/resized/changed file or a load error is reported loudly (which file of which checkpoint) and the
next older checkpoint is tried; when none verifies, ``CheckpointError`` (exit 2). Hashing streams each file in
8 MiB chunks and is split over the ranks (file i is hashed by rank i mod world), so its cost is one extra read of
the checkpoint spread over the ranks (docs/training.md gives a measured rate).

A changed config: the optimizer groups' hyper-parameters (``optim.CONFIGURED_GROUP_KEYS``: the text groups'
lr scale, weight decay, betas, eps) are this run's, not the checkpoint's. A change of ``optim.text_lr_scale``
across 1 changes the group layout, which the saved optimizer state cannot follow: ``ConfigChangeError`` (exit 2)
names the key before anything is loaded, like another world size, rather than calling the checkpoint unusable.

Atomicity: every rank writes into ``step_X.tmp/``; after a barrier rank 0 renames it to ``step_X/`` (a rename is
atomic on POSIX) and then replaces ``latest`` by writing a temporary and renaming it; files and folders are
fsynced first (``alignclip.fs``). A crash at any point leaves either the previous ``latest`` (pointing at a
complete directory) or the new one; a stale ``*.tmp`` is removed at the start of a run (``resume``) and by the
next save (saves are collective, so none is in progress then). A failed write names the path and says "no space
left on device" when the disk is full, and removes its partial ``.tmp``. The file system must be shared by all
ranks (as on a Slurm cluster).
"""

from __future__ import annotations

import errno
import json
import random
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from alignclip.checkpoints import (CONFIG_FILE, LATEST, LEGACY_RNG, MANIFEST, RNG_FILE, STATE_FILE, CheckpointError,
                                   TrainerState, candidates, checkpoint_problem, checkpoints_dir, complete_checkpoints,
                                   print_warning, read_state, step_name, write_manifest)
from alignclip.config import ConfigError, saved_text_lr_scale
from alignclip.distributed.process import any_rank, barrier, rank
from alignclip.fs import atomic_write, publish_dir
from alignclip.training.optim import group_settings, restore_group_settings, splits_text_groups

_LOW_SPACE_BYTES = 1 << 20  # after a failed write, less free space than this means the disk filled up
UNIVERSAL_SUFFIX = "_universal"


class CheckpointWorldSizeError(RuntimeError):
    pass


class ConfigChangeError(ConfigError):
    """The config changes a key in a way the checkpoint cannot follow. Not a damaged checkpoint: raised at once,
    naming the key (exit 2 like any config error), and no older checkpoint is tried."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed; the message names the path and the cause (e.g. no space left on device)."""


# ----------------------------------------------------------------------------------------------------- RNG
def capture_rng() -> dict:
    """This process's RNG states as tensors, numbers and lists only: ``torch.load(weights_only=True)`` reads them
    back, so resuming never unpickles objects (torch / CUDA states are uint8 tensors already; numpy's MT19937 key
    becomes an int64 tensor, python's state a list of ints)."""
    _, key, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                       "cached_gaussian": float(cached)},
             "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        np.random.set_state(("MT19937", numpy_state["key"].numpy().astype(np.uint32), numpy_state["pos"],
                             numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    else:  # legacy: numpy's own tuple
        np.random.set_state(numpy_state)
    python_state = state["python"]
    if isinstance(python_state, dict):
        random.setstate((python_state["version"], tuple(python_state["internal"]), python_state["gauss_next"]))
    else:
        random.setstate(python_state)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_rng(checkpoint: Path, rank: int) -> Optional[dict]:
    """Rank ``rank``'s RNG states of ``checkpoint`` (None when it has none). Loaded with ``weights_only=True``:
    a planted pickle payload fails to load instead of running.

    Fallback for old checkpoints (no manifest, pickled ``rng_rank<R>.pt`` with numpy's tuple): that one file is
    read with ``weights_only=False``, as those checkpoints always were; they are trusted input like DeepSpeed's
    own files (docs/training.md, threat model)."""
    current = checkpoint / RNG_FILE.format(rank=rank)
    if current.is_file():
        return torch.load(current, map_location="cpu", weights_only=True)
    legacy = checkpoint / LEGACY_RNG.format(rank=rank)
    if legacy.is_file() and not (checkpoint / MANIFEST).is_file():
        return torch.load(legacy, map_location="cpu", weights_only=False)
    return None


# ------------------------------------------------------------------------------------------------ manifest
# ---------------------------------------------------------------------------------------------------- save
def save_checkpoint(engine, run_dir: str | Path, state: TrainerState, keep: int,
                    extra: Optional[dict[str, bytes]] = None) -> Path:
    """Collective: every rank calls it at the same step. Returns the final checkpoint directory. ``extra``: more
    files (name -> bytes) rank 0 writes beside the trainer state, covered by the manifest (the run's config)."""
    root = checkpoints_dir(run_dir)
    name = step_name(state.step)
    tmp, final = root / (name + ".tmp"), root / name
    me = rank()
    try:
        if me == 0:
            root.mkdir(parents=True, exist_ok=True)
            remove_stale(root)  # left by a crash during an earlier save
        barrier()
        engine.save_checkpoint(str(root), tag=tmp.name, save_latest=False)
        torch.save(capture_rng(), tmp / RNG_FILE.format(rank=me))
        barrier()  # every rank's files are in tmp
        if me == 0:
            atomic_write(tmp / STATE_FILE, json.dumps(asdict(state), indent=2) + "\n")
            for file_name, data in (extra or {}).items():
                atomic_write(tmp / file_name, data)
        barrier()
        write_manifest(tmp)  # last: it covers every other file
        if me == 0:
            if final.exists():  # the same step saved again (e.g. preempted right after a periodic save)
                shutil.rmtree(final)
            publish_dir(tmp, final)
            atomic_write(root / LATEST, name + "\n")
            prune(root, keep)
    except Exception as err:
        message = describe_write_error(err, tmp)  # before the clean-up: it reads the free space left
        if me == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # frees the space a partial save took
        raise CheckpointWriteError(message) from err
    barrier()
    return final


def describe_write_error(err: Exception, path: Path) -> str:
    """Name the path, and say "no space left on device" when it is so: DeepSpeed's torch.save reports a full disk
    as ``basic_ios::clear: iostream error``, so the free space is checked as well as the errno."""
    full = isinstance(err, OSError) and err.errno == errno.ENOSPC
    free = None
    for probe in (path, path.parent, path.parent.parent):
        try:
            free = shutil.disk_usage(probe).free
            break
        except OSError:
            continue
    full = full or (free is not None and free < _LOW_SPACE_BYTES)
    cause = f"no space left on device ({free} bytes free)" if full else f"{type(err).__name__}: {err}"
    return f"writing checkpoint {path} failed: {cause}"


def remove_stale(root: Path) -> None:
    """Delete ``step_*.tmp`` folders (partial saves of a crashed or failed run). Rank 0, with no save running."""
    for stale in root.glob("step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (``keep`` <= 0 keeps all)."""
    if keep <= 0:
        return
    for old in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- load
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


def trained_text_lr_scale(state: TrainerState, checkpoint: Path) -> Optional[float]:
    """The ``optim.text_lr_scale`` ``checkpoint`` was written with; None when unknown.

    A state from before the field existed: the run directory's config.yaml. Until then a resume across a change of
    the group layout always failed (and a failed resume leaves config.yaml alone), so every checkpoint of the
    directory has the layout of its config.yaml; a config.yaml without the key predates text groups (1.0)."""
    if state.text_lr_scale is not None:
        return state.text_lr_scale
    return saved_text_lr_scale(checkpoint.parent.parent)  # <run_dir>/checkpoints/<step>


def check_text_lr_scale(state: TrainerState, checkpoint: Path, text_lr_scale: float) -> None:
    """Below 1, ``optim.text_lr_scale`` gives the text-only parameters optimizer groups of their own
    (``optim.param_groups``): a checkpoint from one side of 1 holds optimizer state for other groups than a run on
    the other side has, and DeepSpeed's load fails with a message about something else. Another value on the same
    side is fine (``load_checkpoint`` applies it)."""
    saved = trained_text_lr_scale(state, checkpoint)
    if saved is None or splits_text_groups(saved) == splits_text_groups(text_lr_scale):
        return
    keep = "1" if not splits_text_groups(saved) else f"{saved:g} (or any other value below 1)"
    raise ConfigChangeError(
        f"key 'optim.text_lr_scale' is {text_lr_scale:g} but checkpoint {checkpoint} was written with {saved:g}: "
        f"below 1 the text-only parameters have optimizer groups of their own, so the checkpoint's optimizer state "
        f"(AdamW moments per group) does not fit this run's groups. The checkpoint is fine. Either resume with "
        f"optim.text_lr_scale={keep}, or start a new run directory (another name or run_dir) to train with "
        f"{text_lr_scale:g} from the first step.")


def to_universal(checkpoint: Path) -> Path:
    """Collective: DeepSpeed's universal form of ``checkpoint`` (any world size can load it), converted once by
    rank 0 into ``<name>_universal/`` (complete or absent, like every checkpoint) with the trainer state copied."""
    target = checkpoint.with_name(checkpoint.name + UNIVERSAL_SUFFIX)
    if rank() == 0 and not (target / STATE_FILE).is_file():
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--inject_missing_state",
               "--input_folder", str(checkpoint), "--output_folder", str(tmp)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"converting {checkpoint} to a universal checkpoint failed ({' '.join(cmd)}):\n"
                               f"{out.stderr[-3000:]}")
        for name in (STATE_FILE, CONFIG_FILE):
            if (checkpoint / name).is_file():
                shutil.copy2(checkpoint / name, tmp / name)
        publish_dir(tmp, target)
    barrier()
    return target


def load_checkpoint(engine, checkpoint: Path, world_size: int, universal: bool = False,
                    accumulation: int = 1, text_lr_scale: float = 1.0) -> TrainerState:
    """Restore engine (weights, optimizer state, counters) and this rank's RNG; return the trainer state, its data
    position in this run's micro-batches. Another world size goes through a universal checkpoint. The optimizer
    groups keep this run's hyper-parameters (``text_lr_scale`` is this run's ``optim.text_lr_scale``)."""
    state = read_state(checkpoint)
    check_world_size(state, checkpoint, world_size, universal)
    check_text_lr_scale(state, checkpoint, text_lr_scale)
    source = checkpoint
    if state.world_size != world_size and not checkpoint.name.endswith(UNIVERSAL_SUFFIX):
        source = to_universal(checkpoint)
    # DeepSpeed reads this flag at load time only: a universal source needs it, a native one must not have it
    engine._config.load_universal_checkpoint = source.name.endswith(UNIVERSAL_SUFFIX)
    settings = group_settings(engine.optimizer)  # this run's config; the load restores the saved values
    try:
        path, _ = engine.load_checkpoint(str(source.parent), tag=source.name, load_optimizer_states=True,
                                         load_lr_scheduler_states=False)
    finally:  # after a failed load too: resume's next older checkpoint starts from this run's values again
        restore_group_settings(engine.optimizer, settings)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {source}")
    if state.world_size == world_size:  # other world sizes: the ranks keep their fresh seeds
        rng = load_rng(source, rank())
        if rng is not None:
            restore_rng(rng)
    if state.accumulation != accumulation:  # the same number of steps into the epoch
        state.batch_in_epoch = state.batch_in_epoch // state.accumulation * accumulation
    state.accumulation, state.text_lr_scale = accumulation, text_lr_scale
    return state


def resume(engine, run_dir: str | Path, world_size: int, universal: bool = False, accumulation: int = 1,
           warn=None, text_lr_scale: float = 1.0) -> Optional[tuple[Path, TrainerState]]:
    """Collective: restore the newest checkpoint that verifies and loads; None when the run has none.

    Removes stale ``.tmp`` folders first. Each failure (manifest mismatch, unreadable state, load error on any
    rank) is reported through ``warn`` (default: stderr, rank 0 and the failing rank), naming the file and the
    checkpoint, and the next older checkpoint is tried; all ranks take the same decision. When checkpoints exist
    but none is usable: ``CheckpointError``. A world-size mismatch or a config change the checkpoint cannot follow
    (``check_text_lr_scale``) is not a corruption and raises at once.
    """
    warn = warn or print_warning
    root = checkpoints_dir(run_dir)
    if rank() == 0 and root.is_dir():
        remove_stale(root)
    barrier()
    ordered = candidates(root)
    failures = []
    for checkpoint in ordered:
        problem = checkpoint_problem(checkpoint)
        state = None
        if problem is None:
            try:  # load_checkpoint checks the world size and the group layout first (the plan did for the newest)
                state = load_checkpoint(engine, checkpoint, world_size, universal, accumulation, text_lr_scale)
            except (CheckpointWorldSizeError, ConfigChangeError):
                raise
            except Exception as err:  # DeepSpeed / torch errors: name the checkpoint and what was said
                problem = f"{checkpoint}: loading failed on rank {rank()}: {type(err).__name__}: {err}"
        if not any_rank(problem is not None):
            if failures:
                warn(f"WARNING: resuming from {checkpoint}, an OLDER checkpoint, because "
                     f"{len(failures)} newer one(s) failed verification or loading")
            return checkpoint, state
        failures.append(problem or f"{checkpoint}: failed on another rank")
        if problem is not None or rank() == 0:
            warn(f"WARNING: checkpoint {checkpoint} is unusable: {failures[-1]}; trying the next older one")
    if not ordered:
        return None
    raise CheckpointError(f"no checkpoint in {root} verifies or loads ({len(ordered)} tried):\n  "
                          + "\n  ".join(failures) + f"\nmove {root} aside to start the run afresh")


