"""The run plan: everything a training run decides, resolved once, before any model or loader is built.

``resolve_plan(config, env, run_dir)`` -> a frozen ``RunPlan``:

* the step: device, precision, the batch layout (global / micro / accumulation / world, ``distributed.layout``),
  the whole fast path (``pin_memory`` included) and the DeepSpeed config (``StepPlan``; the benchmarks build
  from this alone);
* the data: the shard list, the epoch's length and sample count (``data.pipeline.TrainData``), steps per epoch
  and in total;
* where the caption embeddings E_s come from (shards, a sidecar folder, SBERT online, or not needed) and their
  width, read from the shards, the sidecar or the encoder's own files (never guessed from its name);
* the resume decision: which checkpoint, and every compatibility check done here, once (world size, the
  optimizer's group layout, and the config: ``config_changes`` compares the config the checkpoint trained with
  against this one).

Every inconsistency raises ``ConfigError`` naming the key(s) (exit 2). The plan is logged and written to
``<run_dir>/plan.yaml`` (``write_plan``), beside ``config.yaml`` and the dated history of every config the run used
(``record_config``).

Resuming with a changed config (``train.resume_changes``). Keys that change the model's shape or kind refuse always:
the checkpoint's weights are another model's. Keys that change the data order or the objective (batch sizes, seed,
data spec, loss recipe) refuse unless ``train.resume_changes=carry``: the run then continues at the same number of
samples seen in the epoch, laid out in the new batch (``carried_position``). Everything else (lr, logging,
checkpoint period, workers' prefetch, ...) may change freely and is listed in the log.
"""

from __future__ import annotations

import datetime
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from alignclip import checkpoints
from alignclip.config import Config, from_yaml_text, run_dir_of, to_yaml, with_saved_norm_eps
from alignclip.distributed.env import DistEnv
from alignclip.distributed.layout import BatchLayout, batch_layout
from alignclip.fs import atomic_write
from alignclip.training import checkpoint as ckpt
from alignclip.training.deepspeed_config import build_deepspeed_config, resolve_device
from alignclip.training.fast_path import FastPath, resolve_fast_path
from alignclip.training.flops import encoder_width

PLAN_FILE = "plan.yaml"
CONFIG_FILE = "config.yaml"
CONFIG_HISTORY = "configs"

# Model keys that do not change the weights a checkpoint holds (how the step is computed, not what is trained).
_MODEL_FREE = ("model.grad_checkpointing", "model.pooled_last_block")
# Keys that change the data order: which samples form which step.
DATA_ORDER_KEYS = ("train.global_batch_size", "train.micro_batch_size", "train.seed", "data.train", "data.weights",
                   "data.resampled", "data.samples_per_epoch", "data.workers", "data.shuffle_buffer")
# Data-order keys that a change of world size makes free (the rest of the epoch is re-split across ranks anyway).
_RESPLIT_KEYS = ("train.micro_batch_size", "data.workers")
# Loss keys that say how the objective is computed, not what it is.
_LOSS_FREE = ("loss.impl", "loss.chunk_size", "loss.semantic_batch_size")


@dataclass(frozen=True)
class StepPlan:
    """What one optimizer step runs on: enough for ``build_components`` and the benchmarks."""

    config: Config = field(repr=False)
    env: DistEnv
    device: str  # cuda | cpu
    layout: BatchLayout
    fast: FastPath
    ds_config: dict = field(repr=False)


@dataclass(frozen=True)
class SemanticPlan:
    """Where E_s (IMSep's sentence embeddings) comes from, and its width (0: unknown until the encoder loads)."""

    source: str  # none | shards | sidecar | online
    width: int
    where: str = ""  # the sidecar folder or the encoder


@dataclass(frozen=True)
class ConfigChange:
    key: str
    old: Any
    new: Any
    kind: str  # model | data order | free

    def describe(self) -> str:
        return f"{self.key}: {self.old!r} -> {self.new!r}"


@dataclass(frozen=True)
class ResumePlan:
    checkpoint: Optional[Path]  # the newest complete checkpoint (verified as it loads; older ones on failure)
    step: int = 0
    saved_global_batch: int = 0  # the checkpoint's train.global_batch_size (to carry the position in samples)
    changes: tuple[ConfigChange, ...] = ()
    carry: bool = False  # a data-order key changed under train.resume_changes=carry
    legacy_norm_eps: bool = False


@dataclass(frozen=True)
class RunPlan:
    step: StepPlan
    run_dir: Path
    data: Any  # alignclip.data.pipeline.TrainData
    steps_per_epoch: int
    total_steps: int
    semantic: SemanticPlan
    resume: ResumePlan

    @property
    def config(self) -> Config:
        return self.step.config

    @property
    def layout(self) -> BatchLayout:
        return self.step.layout

    def summary(self) -> dict:
        """The plan as plain data (plan.yaml); the config itself is config.yaml."""
        s, r, d = self.step, self.resume, self.data
        return {
            "run_dir": str(self.run_dir),
            "world": {"size": s.env.world_size, "source": s.env.source},
            "device": s.device, "precision": s.fast.precision,
            "batch": {"global": s.layout.global_batch, "micro": s.layout.micro_batch,
                      "accumulation": s.layout.accumulation, "per_rank_per_step": s.layout.micro_batch
                      * s.layout.accumulation},
            "fast_path": {k: v for k, v in asdict(s.fast).items() if k not in ("device_type", "precision")},
            "data": {"spec": d.spec, "shards": len(d.shards), "samples_per_epoch": d.epoch.samples_per_epoch,
                     "batches_per_epoch_per_rank": d.epoch.batches_per_epoch, "workers": self.config.data.workers,
                     "loader_timeout_s": self.config.data.loader_timeout_s},
            "epochs": {"steps_per_epoch": self.steps_per_epoch, "epochs": self.config.train.epochs,
                       "max_steps": self.config.train.max_steps, "total_steps": self.total_steps},
            "semantic": asdict(self.semantic),
            "resume": {"checkpoint": str(r.checkpoint) if r.checkpoint else None, "step": r.step,
                       "changes": [c.describe() + f" ({c.kind})" for c in r.changes],
                       "position": "carried in samples seen" if r.carry else "exact",
                       "legacy_norm_eps": r.legacy_norm_eps},
            "collective_timeout_s": self.config.train.collective_timeout_s,
            "zero_stage": self.config.deepspeed.zero_stage,
        }

    def describe(self) -> str:
        return OmegaConf.to_yaml(OmegaConf.create(self.summary()))


# ------------------------------------------------------------------------------------------------ the step
def plan_step(config: Config, env: DistEnv) -> StepPlan:
    """Device, precision, batch layout, fast path and DeepSpeed config (``build_components`` builds from it)."""
    layout = batch_layout(config, env.world_size)  # names the keys before anything is built
    device = resolve_device(config.train.device)
    fast = resolve_fast_path(config, device)
    return StepPlan(config=config, env=env, device=device, layout=layout, fast=fast,
                    ds_config=build_deepspeed_config(config, env.world_size, device, layout))


# ------------------------------------------------------------------------------------------------- resume
def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def kind_of(key: str) -> str:
    if key.startswith("model.") and key not in _MODEL_FREE:
        return "model"
    if key in DATA_ORDER_KEYS or (key.startswith("loss.") and key not in _LOSS_FREE):
        return "data order"
    return "free"


def config_changes(old: Config, new: Config) -> list[ConfigChange]:
    """Every key whose value differs between two configs (``launch``, ``run_dir``, ``output_dir`` and ``name``
    say where the run goes, not what it trains: left out)."""
    def flat(config: Config) -> dict[str, Any]:
        return _flatten(OmegaConf.to_container(OmegaConf.structured(config), resolve=True))

    a, b = flat(old), flat(new)
    skip = ("launch.", "run_dir", "output_dir", "name")
    return [ConfigChange(k, a.get(k), b.get(k), kind_of(k)) for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and not k.startswith(skip)]


def saved_config_of(checkpoint: Path, run_dir: Path) -> Optional[Config]:
    """The config ``checkpoint`` trained with: its own copy, else (checkpoints written before they kept one) the
    run directory's config.yaml (a failed resume never rewrote it)."""
    for path in (checkpoint / checkpoints.CONFIG_FILE, run_dir / CONFIG_FILE):
        if path.is_file():
            return from_yaml_text(path.read_text())
    return None


def check_changes(changes: list[ConfigChange], checkpoint: Path, carry_allowed: bool) -> bool:
    """Raise ``ConfigChangeError`` naming every refused key (old and new values); True when data-order keys
    changed and are carried."""
    model = [c for c in changes if c.kind == "model"]
    if model:
        raise ckpt.ConfigChangeError(
            f"the model differs from the one checkpoint {checkpoint} trained: "
            + "; ".join(c.describe() for c in model)
            + ". The checkpoint is intact; its weights belong to the old model. Resume with the old values, or "
              "train the new model in a new run directory (another name or run_dir).")
    order = [c for c in changes if c.kind == "data order"]
    if order and not carry_allowed:
        raise ckpt.ConfigChangeError(
            f"resuming {checkpoint} with keys that change the data order or the objective: "
            + "; ".join(c.describe() for c in order)
            + ". Resume with the old values for an exact continuation, or add train.resume_changes=carry to "
              "continue at the same number of samples seen in the epoch (docs/training.md, 'Changing a run').")
    return bool(order)


def plan_resume(config: Config, run_dir: Path, world_size: int) -> tuple[Config, ResumePlan]:
    """The checkpoint to resume and every check on it; (the config to train with, the decision)."""
    latest = checkpoints.find_latest(run_dir)
    if latest is None:
        return config, ResumePlan(None)
    state = checkpoints.read_state(latest)
    ckpt.check_world_size(state, latest, world_size, config.deepspeed.universal_checkpoint)
    ckpt.check_text_lr_scale(state, latest, config.optim.text_lr_scale)
    config, legacy_eps = with_saved_norm_eps(config, run_dir)
    saved = saved_config_of(latest, run_dir)
    if saved is not None and legacy_eps:  # the run directory's config predates model.norm_eps: so does the run
        saved = replace(saved, model=replace(saved.model, norm_eps=None))
    changes = config_changes(saved, config) if saved is not None else []
    if state.world_size != world_size:
        # another world size (a universal checkpoint) re-splits the epoch's rest anyway, and a new micro-batch is
        # the documented way to keep the global batch on devices of another memory: not refused
        changes = [replace(c, kind="free") if c.key in _RESPLIT_KEYS else c for c in changes]
    carry = check_changes(changes, latest, config.train.resume_changes == "carry")
    saved_global = saved.train.global_batch_size if saved is not None else config.train.global_batch_size
    return config, ResumePlan(latest, state.step, saved_global, tuple(changes), carry, legacy_eps)


def carried_position(state: checkpoints.TrainerState, saved_global_batch: int, plan: "RunPlan") -> checkpoints.TrainerState:
    """The loaded position in this run's layout, by samples seen in the epoch (``train.resume_changes=carry``):
    exact when the samples already read in the epoch are a whole number of new global batches, else the
    refusal names the figures."""
    steps_done = state.batch_in_epoch // max(state.accumulation, 1)
    samples = steps_done * saved_global_batch
    layout = plan.layout
    if samples % layout.global_batch:
        raise ckpt.ConfigChangeError(
            f"train.resume_changes=carry: checkpoint at step {state.step} has read {samples} samples of epoch "
            f"{state.epoch}, not a multiple of the new 'train.global_batch_size' ({layout.global_batch}); resume "
            f"with a global batch that divides {samples}, or from a checkpoint at an epoch boundary")
    new_steps = samples // layout.global_batch
    if new_steps >= plan.steps_per_epoch:  # the epoch is shorter in the new layout: it is over
        return replace(state, epoch=state.epoch + 1, batch_in_epoch=0, accumulation=layout.accumulation)
    return replace(state, batch_in_epoch=new_steps * layout.accumulation, accumulation=layout.accumulation)


# ----------------------------------------------------------------------------------------------- semantic
def plan_semantic(config: Config, data=None) -> SemanticPlan:
    """E_s's source and width: the shards' own embeddings, a sidecar folder, or the encoder online (``data``: the
    run's ``TrainData``; None, as for a benchmark's synthetic batches: the encoder's width)."""
    from alignclip.losses import build_objective

    if not build_objective(config.loss).needs_semantic:
        return SemanticPlan("none", 0)
    if config.data.semantic_dir and data is not None:
        from alignclip.data.sidecars import read_sidecar

        # the width of the first shard's rows (data.plan_train_data checked every sidecar against its shard)
        embeddings = read_sidecar(config.data.semantic_dir, data.shards[0]).embeddings
        width = int(embeddings.shape[1]) if embeddings.ndim == 2 and len(embeddings) else 0
        return SemanticPlan("sidecar", width, config.data.semantic_dir)
    if data is not None and data.with_semantic:
        return SemanticPlan("shards", data.semantic_dim, config.data.semantic_key)
    return SemanticPlan("online", encoder_width(config.loss.semantic_model), config.loss.semantic_model)


# ---------------------------------------------------------------------------------------------------- run
def resolve_plan(config: Config, env: DistEnv, run_dir: Optional[Path] = None) -> RunPlan:
    """Resolve a training run once (see the module docstring). Reads the run directory and the shards' metadata
    (counting the samples on rank 0 when a process group is up); builds no model and no loader."""
    from alignclip.data.pipeline import plan_train_data

    run_dir = Path(run_dir) if run_dir is not None else run_dir_of(config)
    batch_layout(config, env.world_size)  # the batch keys first: the cheapest check
    config, resume = plan_resume(config, run_dir, env.world_size)
    step = plan_step(config, env)
    data = plan_train_data(config, step.layout)
    steps_per_epoch = data.epoch.batches_per_epoch // step.layout.accumulation
    total_steps = config.train.epochs * steps_per_epoch
    if config.train.max_steps > 0:
        total_steps = min(total_steps, config.train.max_steps)
    return RunPlan(step=step, run_dir=run_dir, data=data, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                   semantic=plan_semantic(config, data), resume=resume)


def write_plan(plan: RunPlan) -> Path:
    """``<run_dir>/plan.yaml`` (atomic), rewritten by every session."""
    return atomic_write(plan.run_dir / PLAN_FILE,
                        f"# the run plan of the session started {_now()} (alignclip.training.plan)\n" + plan.describe())


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H-%M-%SZ")


def record_config(config: Config, run_dir: Path) -> Path:
    """``config.yaml`` (this session's config) and ``configs/<UTC time>.yaml``: every config the run used is
    kept. Rank 0, after the resume checks passed."""
    text = to_yaml(config)
    history = run_dir / CONFIG_HISTORY
    history.mkdir(parents=True, exist_ok=True)
    dated = history / f"config-{_now()}.yaml"
    for target in (dated, run_dir / CONFIG_FILE):
        atomic_write(target, text)
    return dated
