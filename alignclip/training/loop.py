"""The training loop: DeepSpeed engine, exact resume, preemption, monitoring. ``train(config)`` runs one job.

Reading order: ``train`` (the loop, one screen) -> ``_train_step`` (one optimizer step over its accumulation
micro-batches) -> ``_setup`` (everything built before the first step).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist

from alignclip.config import Config, config_hash, run_dir_of, save_config
from alignclip.distributed.env import DistEnv, setup_distributed_env
from alignclip.losses.temperature import clamp_logit_scale_
from alignclip.data.transforms import normalize_on_device
from alignclip.perf.fast_path import (FastPath, compile_engine, images_to_device, prepare_model, resolve_fast_path,
                                      tokens_to_device)
from alignclip.training import checkpoint as ckpt
from alignclip.training.deepspeed_config import (batch_layout, build_deepspeed_config, resolve_device,
                                                 write_deepspeed_config)
from alignclip.training.engine import initialize_engine
from alignclip.training.monitor import Monitor, memory_gb
from alignclip.training.optim import build_optimizer
from alignclip.training.preemption import REQUEUE_EXIT_CODE, PreemptionFlag, any_rank
from alignclip.training.schedule import lr_at, set_lr


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class RunResult:
    exit_code: int  # 0 finished, REQUEUE_EXIT_CODE preempted (checkpoint written)
    step: int
    run_dir: Path
    checkpoint: Optional[Path]
    gap: dict = field(default_factory=dict)  # the last live gap metrics (rank 0)
    eval: dict = field(default_factory=dict)  # the last eval/* figures (rank 0, when eval.every_steps > 0)
    losses: list = field(default_factory=list)  # (step, global-batch total loss) of every step of this session


@dataclass
class _Run:
    config: Config
    env: DistEnv
    run_dir: Path
    engine: object
    objective: torch.nn.Module
    state: ckpt.TrainerState
    monitor: Monitor
    preemption: PreemptionFlag
    device: torch.device
    input_dtype: torch.dtype
    accumulation: int
    steps_per_epoch: int
    total_steps: int
    eval_batch: Optional[dict]
    semantic_encoder: object = None
    loader: object = None  # the current epoch's TrainLoader
    data_counts: dict = field(default_factory=dict)  # loader counters of the finished epochs
    skips_in_a_row: int = 0
    fast: Optional[FastPath] = None  # the resolved fast-path switches (None: plain copies, as built by hand)
    flops_per_sample: float = 0.0  # model FLOPs of one training step per sample (alignclip.perf.flops)
    peak_tflops: Optional[float] = None  # the device's peak for MFU; None: unknown (CPUs), MFU not logged


def train(config: Config, dist_env: Optional[DistEnv] = None) -> RunResult:
    """Train until ``total_steps`` or a preemption signal; resume from the run directory if it has a checkpoint."""
    run = _setup(config, dist_env or setup_distributed_env())
    state, cfg, mon = run.state, run.config, run.monitor
    result = RunResult(0, state.step, run.run_dir, ckpt.find_latest(run.run_dir))
    window, shown = _Window(), {}
    try:
        while state.step < run.total_steps:
            batches = _epoch_batches(run)
            while state.step < run.total_steps and state.batch_in_epoch < run.steps_per_epoch * run.accumulation:
                stats = _train_step(run, batches, window)
                result.losses.append((state.step, stats["loss/total"]))
                last = state.step == run.total_steps
                if _every(state.step, cfg.logging.log_every_steps) or last:
                    rates = window.rates(run)
                    mon.scalars(state.step, {**stats, **rates, **memory_gb(), **_data_counts(run)})
                    shown = {short: rates[tag] for short, tag in _BAR_RATES.items() if tag in rates}
                    window = _Window()
                if _every(state.step, cfg.logging.gap_every_steps) or last:
                    result.gap = _log_gap_metrics(run)
                if cfg.eval.every_steps and (_every(state.step, cfg.eval.every_steps) or last) and run.env.is_main:
                    from alignclip.eval.benchmark import evaluate_during_training
                    result.eval = mon.evaluation(state.step, evaluate_during_training(run.engine.module, cfg))
                mon.advance(state.step, {"loss": stats["loss/total"], "lr": stats["train/lr"], **shown})
                preempted = run.preemption.agree()  # collective: every rank stops at the same step
                if preempted or _every(state.step, cfg.train.checkpoint_every_steps) or last:
                    result.checkpoint = ckpt.save_checkpoint(run.engine, run.run_dir, state, cfg.train.keep_checkpoints)
                    mon.flush()
                if preempted:
                    mon.info(f"preempted ({run.preemption.describe()}): saved {result.checkpoint} at step "
                             f"{state.step}; exiting with {REQUEUE_EXIT_CODE} to be requeued")
                    result.exit_code = REQUEUE_EXIT_CODE
                    batches.close()  # shuts the loader's workers down (they ignore the signal) before exiting
                    return _finish(run, result)
            _close_epoch_counts(run)
            del batches  # stops the loader's workers
            if state.batch_in_epoch >= run.steps_per_epoch * run.accumulation:
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        mon.info(f"done: {state.step} steps, {state.samples_seen} samples; checkpoint {result.checkpoint}")
        return _finish(run, result)
    except BaseException:
        run.monitor.close()
        run.preemption.restore()
        raise


def _train_step(run: _Run, batches: Iterator[dict], window: "_Window") -> dict[str, float]:
    """One optimizer step: ``accumulation`` micro-batches through forward, objective, ``engine.backward``."""
    state, engine, cfg = run.state, run.engine, run.config.train
    lr = lr_at(state.step, cfg.lr, cfg.warmup_steps, run.total_steps, cfg.min_lr)
    set_lr(engine.optimizer, lr)
    started, waited, skipped = time.perf_counter(), 0.0, False
    sums: dict[str, torch.Tensor] = {}
    for _ in range(run.accumulation):
        t = time.perf_counter()
        batch = next(batches)
        waited += time.perf_counter() - t
        outputs = engine(*_to_device(run, batch))
        loss = run.objective(outputs["image_embeds"], outputs["text_embeds"], outputs["log_logit_scale"],
                             _semantic_embeddings(run, batch))
        bad_term = _nonfinite_term(loss)
        if any_rank(bad_term is not None, run.device):  # collective: all ranks take the same branch
            if cfg.nonfinite == "stop" or run.skips_in_a_row >= cfg.max_skipped_steps:
                where = f"term '{bad_term}'" if bad_term else "a term on another rank"
                raise NonFiniteLossError(f"non-finite loss at step {state.step} (epoch {state.epoch}, batch "
                                         f"{state.batch_in_epoch}): {where}; set train.nonfinite=skip to skip such "
                                         f"batches (at most train.max_skipped_steps={cfg.max_skipped_steps})")
            # skip: a zero-valued loss over the parameters, so this batch adds an exact zero gradient
            total, skipped = sum((p * 0.0).sum() for p in engine.module.parameters() if p.requires_grad), True
        else:
            total = loss.total
            for name, value in {"total": loss.total.detach(), **loss.terms}.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float() / run.accumulation
        engine.backward(total)
        engine.step()  # DeepSpeed steps the optimizer (with clipping) at the accumulation boundary only
    # The forward clamp bounds the scale the loss uses; this keeps the STORED value (and ZeRO's fp32 master copy)
    # at most ln 100 too, so the temperature never freezes above the bound where the clamp passes no gradient.
    clamp_logit_scale_(engine, engine.module.max_logit_scale)
    state.step += 1
    state.samples_seen += run.config.train.global_batch_size
    state.batch_in_epoch += run.accumulation
    state.skipped_steps += int(skipped)
    run.skips_in_a_row = run.skips_in_a_row + 1 if skipped else 0
    window.add(time.perf_counter() - started, waited)
    # Each rank's loss is its share of the global-batch loss: the mean over ranks is the global value.
    names = sorted(sums)
    values = torch.stack([sums[n] for n in names]) if names else torch.zeros(0)
    if dist.is_initialized() and run.env.world_size > 1:
        values = values.to(run.device)
        dist.all_reduce(values)
        values = values / run.env.world_size
    stats = {f"loss/{n}": float(v) for n, v in zip(names, values.cpu())}
    stats.setdefault("loss/total", float("nan"))
    scale = float(outputs["log_logit_scale"].detach().float().exp())
    grad_norm = engine.get_global_grad_norm()
    stats.update({"train/lr": lr, "train/logit_scale": scale, "train/temperature": 1.0 / scale,
                  "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                  "train/epoch": state.epoch + state.batch_in_epoch / (run.steps_per_epoch * run.accumulation),
                  "train/skipped_steps": state.skipped_steps})
    return stats


# throughput on the console's progress bar, as of the last log step
_BAR_RATES = {"samples/s": "perf/samples_per_s", "TFLOP/s/dev": "perf/tflops_per_device", "mfu": "perf/mfu"}


class _Window:
    """Time and data-wait accumulated since the last log line, for throughput figures."""

    def __init__(self):
        self.steps, self.seconds, self.wait = 0, 0.0, 0.0

    def add(self, seconds: float, wait: float) -> None:
        self.steps, self.seconds, self.wait = self.steps + 1, self.seconds + seconds, self.wait + wait

    def rates(self, run: _Run) -> dict[str, float]:
        if not self.steps or self.seconds <= 0:
            return {}
        samples_per_s = self.steps * run.config.train.global_batch_size / self.seconds
        per_device = samples_per_s / run.env.world_size
        rates = {"perf/samples_per_s": samples_per_s, "perf/samples_per_s_per_device": per_device,
                 "perf/data_wait_share": self.wait / self.seconds, "perf/step_time_s": self.seconds / self.steps}
        if run.flops_per_sample:
            # model FLOPs (no recompute) per second and device; MFU only where the device's peak is known
            tflops = per_device * run.flops_per_sample / 1e12
            rates["perf/tflops_per_device"] = tflops
            if run.peak_tflops:
                rates["perf/mfu"] = tflops / run.peak_tflops
        return rates


def _to_device(run: _Run, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (cast to the input dtype) and tokens on the device: asynchronous copies from pinned batches and
    channels-last images when the fast path says so."""
    if run.fast is None:
        return normalize_on_device(batch["image"].to(run.device), run.input_dtype), batch["text"].to(run.device)
    return (images_to_device(batch["image"], run.device, run.input_dtype, run.fast),
            tokens_to_device(batch["text"], run.device, run.fast))


def _every(step: int, period: int) -> bool:
    """Periodic actions; a period of 0 means only at the end (and, for checkpoints, on preemption)."""
    return period > 0 and step % period == 0


def _nonfinite_term(loss) -> Optional[str]:
    for name, value in {**loss.terms, "total": loss.total}.items():
        if not bool(torch.isfinite(value.detach()).all()):
            return name
    return None


def _semantic_embeddings(run: _Run, batch: dict) -> Optional[torch.Tensor]:
    """E_s for IMSep's rescaling: precomputed in the shards when present, else SBERT online (frozen)."""
    if not getattr(run.objective, "needs_semantic", False):
        return None
    if batch.get("semantic") is not None:
        return batch["semantic"].to(run.device).float()
    if run.semantic_encoder is None:
        from alignclip.semantic import SemanticEncoder

        run.semantic_encoder = SemanticEncoder(run.config.loss.semantic_model, run.device.type,
                                              batch_size=run.config.loss.semantic_batch_size)
        run.monitor.info(f"semantic embeddings: encoding captions online with {run.config.loss.semantic_model}")
    return run.semantic_encoder.encode(list(batch["caption"])).to(run.device).float()


@torch.no_grad()
def _log_gap_metrics(run: _Run) -> dict[str, float]:
    """Live gap on the fixed held-out batch (rank 0): alignment, centroid distance, paired-cosine histogram,
    and in-batch retrieval R@1 (chance = 1 / batch) to show that the model learns the task, not only the gap."""
    if run.eval_batch is None:
        return {}
    from alignclip.analysis.metrics import alignment_score, centroid_distance, paired_cosines
    from alignclip.eval.retrieval import retrieval_metrics

    model = run.engine.module
    was_training = model.training
    model.eval()
    images = model.encode_image(run.eval_batch["image"].to(run.device, run.input_dtype), normalize=True).float().cpu()
    texts = model.encode_text(run.eval_batch["text"].to(run.device), normalize=True).float().cpu()
    model.train(was_training)
    retrieval = retrieval_metrics(images, texts, ks=(1,))
    gap = {"gap/alignment_score": alignment_score(images, texts),
           "gap/centroid_distance": centroid_distance(images, texts),
           **{f"gap/{k}": float(v) for k, v in retrieval.items()}}
    run.monitor.scalars(run.state.step, gap)
    run.monitor.histogram(run.state.step, "gap/paired_cosine", paired_cosines(images, texts))
    run.monitor.gap_plots(run.state.step, images, texts)
    return gap


def _epoch_batches(run: _Run) -> Iterator[dict]:
    from alignclip.data import build_train_loader

    run.loader = build_train_loader(run.config, run.env.rank, run.env.world_size, run.state.epoch,
                                    start_batch=run.state.batch_in_epoch)
    return iter(run.loader)


def _data_counts(run: _Run) -> dict[str, float]:
    """The loader's counters (samples read; corrupt, missing or empty samples and bad shards skipped), summed over
    ranks (a collective: every rank logs at the same steps) and over this process's epochs, as data/<counter>."""
    from alignclip.data.pipeline import reduce_stats

    epoch = reduce_stats(run.loader.stats()) if run.loader is not None else {}
    return {f"data/{name}": float(run.data_counts.get(name, 0) + epoch.get(name, 0))
            for name in sorted(set(run.data_counts) | set(epoch)) if name != "batches"}


def _close_epoch_counts(run: _Run) -> None:
    """Fold the finished loader's counters into the run's; say so in train.log when samples were skipped."""
    if run.loader is None:
        return
    from alignclip.data.pipeline import reduce_stats

    epoch = reduce_stats(run.loader.stats())
    skipped = {k: v for k, v in epoch.items() if v and k not in ("samples_read", "batches", "wrapped_passes")}
    if skipped:
        run.monitor.info(f"data: epoch {run.state.epoch} skipped {skipped} (counted in TensorBoard as data/*)")
    for name, value in epoch.items():
        run.data_counts[name] = run.data_counts.get(name, 0) + value
    run.loader = None


def _finish(run: _Run, result: RunResult) -> RunResult:
    result.step = run.state.step
    if result.exit_code == 0:
        run.monitor.hparams(run.config, {**result.gap, **result.eval})
    run.monitor.flush()
    run.monitor.close()
    run.preemption.restore()
    return result


def _seed(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _setup(config: Config, env: DistEnv) -> _Run:
    import deepspeed

    from alignclip.data import build_eval_batch, build_train_loader
    from alignclip.losses import build_objective
    from alignclip.models import build_model
    from alignclip.perf.flops import step_flops
    from alignclip.perf.peaks import peak_tflops

    device_type = resolve_device(config.train.device)
    layout = batch_layout(config, env.world_size)  # fails early, naming the keys, before any process group
    if device_type == "cuda":
        torch.cuda.set_device(env.local_rank)
    device = torch.device(device_type, env.local_rank) if device_type == "cuda" else torch.device("cpu")
    preemption = PreemptionFlag(device=device)  # first: a signal during set-up must not kill the job unsaved
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device_type == "cuda" else "gloo",
                                   auto_mpi_discovery=False, verbose=False)
    run_dir = run_dir_of(config)
    if env.is_main:
        save_config(config, run_dir)
    ds_config = build_deepspeed_config(config, env.world_size, device_type)
    if env.is_main:
        write_deepspeed_config(ds_config, run_dir)
    dist.barrier()

    # the data spec and a checkpoint's world size are checked before the (possibly large) model is built
    latest = ckpt.find_latest(run_dir)
    if latest is not None:
        ckpt.check_world_size(ckpt.read_state(latest), latest, env.world_size, config.deepspeed.universal_checkpoint)
    steps_per_epoch = len(build_train_loader(config, env.rank, env.world_size, 0)) // layout.accumulation
    _seed(config.train.seed)  # the same initial weights on every rank
    fast = resolve_fast_path(config, device_type)
    model = prepare_model(build_model(config.model), fast)
    engine = compile_engine(initialize_engine(model, build_optimizer(model, config.train, fast.adamw_impl),
                                              ds_config), fast)
    _seed(config.train.seed + 1_000_003 * env.rank)  # per-rank streams for anything random in the step
    objective = build_objective(config.loss).to(device)

    state = ckpt.TrainerState(world_size=env.world_size, accumulation=layout.accumulation,
                              config_hash=config_hash(config))
    # verified resume: the newest checkpoint whose manifest and load check out (older ones on failure, loudly)
    resumed = ckpt.resume(engine, run_dir, env.world_size, config.deepspeed.universal_checkpoint, layout.accumulation)
    if resumed is not None:
        latest, state = resumed
    resumed_hash, state.config_hash, state.world_size = state.config_hash, config_hash(config), env.world_size

    total_steps = config.train.epochs * steps_per_epoch
    if config.train.max_steps > 0:
        total_steps = min(total_steps, config.train.max_steps)
    monitor = Monitor(run_dir, config.logging, env.is_main, total_steps, state.step)
    monitor.run_config(config, state.step)
    if latest is not None:
        monitor.info(f"resumed from {latest} at step {state.step} (epoch {state.epoch}, batch {state.batch_in_epoch})")
        if resumed_hash != state.config_hash:
            monitor.info(f"warning: the config differs from the checkpoint's (hash {resumed_hash} -> "
                         f"{state.config_hash}); see {run_dir / 'config.yaml'}")
    monitor.info(f"run {run_dir}: world {env.world_size} ({env.source}), {device_type}, global batch "
                 f"{layout.global_batch} = {layout.micro_batch} x {layout.accumulation} x {env.world_size}, "
                 f"{steps_per_epoch} steps/epoch, {total_steps} steps, zero stage {config.deepspeed.zero_stage}")
    flops = step_flops(config)
    peak = peak_tflops(device, fast.precision, config.train.peak_tflops)
    peak_text = f"{peak:g} TFLOP/s" if peak else "unknown (perf/mfu not logged; set train.peak_tflops)"
    monitor.info(f"fast path: {fast.describe()}; {flops.total / 1e9:.4g} GFLOP per sample per step (model FLOPs), "
                 f"device peak {peak_text}")
    eval_batch = build_eval_batch(config, config.logging.gap_batch_size) if env.is_main else None
    input_dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
    return _Run(config=config, env=env, run_dir=run_dir, engine=engine, objective=objective, state=state,
                monitor=monitor, preemption=preemption, device=device, input_dtype=input_dtype,
                accumulation=layout.accumulation, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                eval_batch=eval_batch, fast=fast, flops_per_sample=flops.total, peak_tflops=peak)
