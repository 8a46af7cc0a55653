"""The trainer: DeepSpeed engine, exact resume, preemption, monitoring. ``train(config)`` runs one job.

Reading order: ``Trainer.train`` (the loop, one screen) -> ``Trainer.train_step`` (one optimizer step over its
accumulation micro-batches) -> ``Trainer.__init__`` (everything built before the first step; the engine itself comes
from ``components.build_components``, shared with the benchmarks).

Host-device synchronisation. A step reads the device only where correctness needs it:
  * per micro-batch, ONE read of the loss terms' non-finite flags (MAX-reduced over ranks in the same call): the
    ``train.nonfinite`` policy must decide before ``backward`` whether this batch's gradient is replaced by zero,
    and every rank must take the same branch (the gradient all-reduce would otherwise mix a NaN into all ranks);
  * per step, the preemption agreement (one all-reduce): every rank must stop at the same step;
  * DeepSpeed's skipped-step counter is a host integer (DeepSpeed reads its overflow flag inside ``engine.step``
    anyway, for its own skip decision), so checking it costs nothing.
Losses, the temperature and the gradient norm stay on the device and are read at log steps only, all steps of the
window in one reduction and one read (``read_stats``); the progress bar's loss is the last log step's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

import numpy as np
import torch
import torch.distributed as dist

from alignclip.config import Config, config_hash, run_dir_of, save_config, with_saved_norm_eps
from alignclip.distributed.env import DistEnv, setup_distributed_env
from alignclip.losses.temperature import clamp_logit_scale_
from alignclip.training import checkpoint as ckpt
from alignclip.training.components import Components, build_components, init_process_group
from alignclip.training.deepspeed_config import batch_layout, write_deepspeed_config
from alignclip.training.monitor import Monitor, memory_gb
from alignclip.training.optim import scale_text_gradient
from alignclip.training.preemption import REQUEUE_EXIT_CODE, PreemptionFlag
from alignclip.training.schedule import lr_at, set_lr


class NonFiniteLossError(RuntimeError):
    """A non-finite loss term or an overflowing (skipped) optimizer step that the ``train.nonfinite`` policy
    does not allow; the message names the step and the cause."""


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
class StepResult:
    """One optimizer step, as ``train_step`` leaves it: host figures, and the loss terms still on the device."""

    step: int  # the step count after this step
    lr: float
    skipped: bool  # a non-finite batch replaced by a zero gradient, or an optimizer step DeepSpeed skipped
    epoch: float  # fractional epoch after this step
    skipped_steps: int  # the run's total so far
    seconds: float
    data_wait: float
    losses: dict = field(default_factory=dict)  # term -> this rank's share of the global-batch loss (device)
    logit_scale: Optional[torch.Tensor] = None  # the stored log scale the last forward used (device)

    def local_loss(self) -> float:
        """This rank's total (a host read; the global value is ``Trainer.read_stats``)."""
        value = self.losses.get("total")
        return float(value) if value is not None else float("nan")


class ThroughputWindow:
    """Time and data-wait accumulated since the last log line, for throughput figures."""

    def __init__(self):
        self.steps, self.seconds, self.wait = 0, 0.0, 0.0

    def add(self, seconds: float, wait: float) -> None:
        self.steps, self.seconds, self.wait = self.steps + 1, self.seconds + seconds, self.wait + wait

    def rates(self, global_batch: int, world_size: int, flops_per_sample: float,
              peak_tflops: Optional[float]) -> dict[str, float]:
        if not self.steps or self.seconds <= 0:
            return {}
        samples_per_s = self.steps * global_batch / self.seconds
        per_device = samples_per_s / world_size
        rates = {"perf/samples_per_s": samples_per_s, "perf/samples_per_s_per_device": per_device,
                 "perf/data_wait_share": self.wait / self.seconds, "perf/step_time_s": self.seconds / self.steps}
        if flops_per_sample:
            # model FLOPs (no recompute) per second and device; MFU only where the device's peak is known
            tflops = per_device * flops_per_sample / 1e12
            rates["perf/tflops_per_device"] = tflops
            if peak_tflops:
                rates["perf/mfu"] = tflops / peak_tflops
        return rates


# throughput on the console's progress bar, as of the last log step
_BAR_RATES = {"samples/s": "perf/samples_per_s", "TFLOP/s/dev": "perf/tflops_per_device", "mfu": "perf/mfu"}


def every(step: int, period: int) -> bool:
    """Periodic actions; a period of 0 means only at the end (and, for checkpoints, on preemption)."""
    return period > 0 and step % period == 0


class Trainer:
    """One training job over a run directory: ``Trainer(config, env).train()``, or ``train_step`` by hand.

    ``Trainer.over(components, total_steps)`` is the bare step (no run directory, data, monitor or checkpoints)
    that the OpenCLIP race times: the same ``train_step`` as a run."""

    def __init__(self, config: Config, env: Optional[DistEnv] = None):
        from alignclip.data import build_eval_batch, build_train_loader
        from alignclip.training.flops import step_flops
        from alignclip.training.peaks import peak_tflops

        env = env or setup_distributed_env()
        layout = batch_layout(config, env.world_size)  # fails early, naming the keys, before any process group
        device = init_process_group(config, env)
        self.preemption = PreemptionFlag(device=device)  # early: a signal during set-up must not kill the job
        try:
            run_dir = run_dir_of(config)
            from alignclip.training.deepspeed_config import build_deepspeed_config

            ds_config = build_deepspeed_config(config, env.world_size, device.type)
            if env.is_main:
                run_dir.mkdir(parents=True, exist_ok=True)
                write_deepspeed_config(ds_config, run_dir)
            dist.barrier()
            # the data spec and a checkpoint's world size and optimizer group layout are checked before the
            # (possibly large) model is built
            latest = ckpt.find_latest(run_dir)
            legacy_eps = False
            if latest is not None:
                saved = ckpt.read_state(latest)
                ckpt.check_world_size(saved, latest, env.world_size, config.deepspeed.universal_checkpoint)
                ckpt.check_text_lr_scale(saved, latest, config.optim.text_lr_scale)
                config, legacy_eps = with_saved_norm_eps(config, run_dir)
            steps_per_epoch = len(build_train_loader(config, env.rank, env.world_size, 0)) // layout.accumulation
            components = build_components(config, env)
            state = ckpt.TrainerState(world_size=env.world_size, accumulation=layout.accumulation,
                                      config_hash=config_hash(config), text_lr_scale=config.optim.text_lr_scale)
            # verified resume: the newest checkpoint whose manifest and load check out (older ones on failure,
            # loudly); stale .tmp folders of an interrupted save are removed first
            resumed = ckpt.resume(components.engine, run_dir, env.world_size, config.deepspeed.universal_checkpoint,
                                  layout.accumulation, text_lr_scale=config.optim.text_lr_scale)
            if resumed is not None:
                latest, state = resumed
            # written only now: a resume that failed (another model, another world size) keeps the run's config
            if env.is_main:
                save_config(config, run_dir)
        except BaseException:
            self.preemption.restore()
            raise
        resumed_hash, state.config_hash, state.world_size = state.config_hash, config_hash(config), env.world_size

        total_steps = config.train.epochs * steps_per_epoch
        if config.train.max_steps > 0:
            total_steps = min(total_steps, config.train.max_steps)
        self._init_step(components, state, total_steps, steps_per_epoch)
        self.run_dir = run_dir
        self.monitor = monitor = Monitor(run_dir, config.logging, env.is_main, total_steps, state.step)
        try:  # from here a failure closes the monitor (its events reach disk) and restores the handlers
            monitor.run_config(config, state.step)
            self.latest = latest
            if latest is not None:
                monitor.info(f"resumed from {latest} at step {state.step} (epoch {state.epoch}, batch "
                             f"{state.batch_in_epoch})")
                if legacy_eps:
                    monitor.info("the run predates model.norm_eps: its LayerNorms keep the eps it trained with "
                                 "(1e-6 in the blocks, 1e-5 in the stem and final norms)")
                if resumed_hash != state.config_hash:
                    monitor.info(f"warning: the config differs from the checkpoint's (hash {resumed_hash} -> "
                                 f"{state.config_hash}); see {run_dir / 'config.yaml'}")
            monitor.info(f"run {run_dir}: world {env.world_size} ({env.source}), {device.type}, global batch "
                         f"{layout.global_batch} = {layout.micro_batch} x {layout.accumulation} x {env.world_size}, "
                         f"{steps_per_epoch} steps/epoch, {total_steps} steps, "
                         f"zero stage {config.deepspeed.zero_stage}")
            flops = step_flops(config)
            self.flops_per_sample = flops.total
            self.peak_tflops = peak_tflops(device, components.fast.precision, config.fast_path.peak_tflops)
            peak_text = (f"{self.peak_tflops:g} TFLOP/s" if self.peak_tflops
                         else "unknown (perf/mfu not logged; set fast_path.peak_tflops)")
            monitor.info(f"fast path: {components.fast.describe()}; {flops.total / 1e9:.4g} GFLOP per sample per "
                         f"step (model FLOPs), device peak {peak_text}")
            self.eval_batch = build_eval_batch(config, config.logging.gap_batch_size) if env.is_main else None
        except BaseException:
            self.close()
            raise

    @classmethod
    def over(cls, components: Components, total_steps: int) -> "Trainer":
        """The bare step over ready ``components`` (benchmarks, tests): no run directory, data or monitor."""
        trainer = cls.__new__(cls)
        trainer._init_step(components, ckpt.TrainerState(world_size=components.env.world_size,
                                                         accumulation=components.layout.accumulation,
                                                         text_lr_scale=components.config.optim.text_lr_scale),
                           total_steps, steps_per_epoch=total_steps)
        trainer.preemption, trainer.monitor, trainer.run_dir, trainer.latest = None, None, None, None
        trainer.eval_batch, trainer.flops_per_sample, trainer.peak_tflops = None, 0.0, None
        return trainer

    def _init_step(self, components: Components, state: ckpt.TrainerState, total_steps: int,
                   steps_per_epoch: int) -> None:
        self.components = components
        self.config, self.env, self.engine = components.config, components.env, components.engine
        self.state = state
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        self.accumulation = components.layout.accumulation
        self.skips_in_a_row = 0
        self.loader = None  # the current epoch's TrainLoader
        self.data_counts: dict = {}  # loader counters of the finished epochs

    # ------------------------------------------------------------------------------------------------ the loop
    def train(self) -> RunResult:
        """Train until ``total_steps`` or a preemption signal; the run directory's latest checkpoint was resumed."""
        state, cfg, mon = self.state, self.config, self.monitor
        result = RunResult(0, state.step, self.run_dir, self.latest)
        window, pending, shown = ThroughputWindow(), [], {}
        epoch_batches = self.accumulation * self.steps_per_epoch
        try:
            while state.step < self.total_steps:
                batches = self.epoch_batches()
                while state.step < self.total_steps and state.batch_in_epoch < epoch_batches:
                    step = self.train_step(batches)
                    window.add(step.seconds, step.data_wait)
                    pending.append(step)
                    last = state.step == self.total_steps
                    if cfg.eval.every_steps and (every(state.step, cfg.eval.every_steps) or last) and self.env.is_main:
                        # before agree(): a signal that arrives during the evaluation ends it and saves this step
                        result.eval = self.evaluate() or result.eval
                    preempted = self.preemption.agree()  # collective: every rank stops at the same step
                    if every(state.step, cfg.logging.log_every_steps) or last or preempted:
                        stats = self.log_step(pending, result, window)
                        shown = {"loss": stats["loss/total"], "lr": stats["train/lr"],
                                 **{short: stats[tag] for short, tag in _BAR_RATES.items() if tag in stats}}
                        window, pending = ThroughputWindow(), []
                    if every(state.step, cfg.logging.gap_every_steps) or last:
                        result.gap = self.log_gap_metrics()
                    mon.advance(state.step, shown)
                    if preempted or every(state.step, cfg.checkpoint.every_steps) or last:
                        result.checkpoint = ckpt.save_checkpoint(self.engine, self.run_dir, state,
                                                                 cfg.checkpoint.keep)
                        mon.flush()
                    if preempted:
                        mon.info(f"preempted ({self.preemption.describe()}): saved {result.checkpoint} at step "
                                 f"{state.step}; exiting with {REQUEUE_EXIT_CODE} to be requeued")
                        result.exit_code = REQUEUE_EXIT_CODE
                        batches.close()  # shuts the loader's workers down (they ignore the signal) before exiting
                        return self.finish(result)
                self.close_epoch_counts()
                del batches  # stops the loader's workers
                if state.batch_in_epoch >= epoch_batches:
                    state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            mon.info(f"done: {state.step} steps, {state.samples_seen} samples; checkpoint {result.checkpoint}")
            return self.finish(result)
        except BaseException:
            self.close()
            raise

    def evaluate(self) -> dict[str, float]:
        """The ``eval`` section at this step (rank 0), logged as eval/*; {} when a pending preemption stopped it
        (at its next batch: the checkpoint follows at once)."""
        from alignclip.eval.benchmark import EvaluationStopped, evaluate_during_training

        try:
            figures = evaluate_during_training(self.components.model, self.config,
                                               should_stop=self.preemption.pending)
        except EvaluationStopped as stop:
            self.monitor.info(f"evaluation at step {self.state.step} stopped {stop}: preemption pending "
                              f"({self.preemption.describe()}); no eval figures for this step")
            return {}
        return self.monitor.evaluation(self.state.step, figures)

    def log_step(self, pending: list[StepResult], result: RunResult, window: ThroughputWindow) -> dict[str, float]:
        """The log step: the window's losses read at once (collective), its last step's stats to TensorBoard."""
        per_step = self.read_stats(pending)
        result.losses += [(s.step, stats["loss/total"]) for s, stats in zip(pending, per_step)]
        stats = {**per_step[-1], **window.rates(self.config.train.global_batch_size, self.env.world_size,
                                                self.flops_per_sample, self.peak_tflops)}
        self.monitor.scalars(self.state.step, {**stats, **memory_gb(), **self.data_counts_now()})
        return stats

    # ------------------------------------------------------------------------------------------------ the step
    def train_step(self, micro_batches: Union[dict, Iterable[dict]]) -> StepResult:
        """One optimizer step: ``accumulation`` micro-batches (an iterator of host batches; a single dict when
        there is no accumulation) through forward, objective, ``engine.backward`` and ``engine.step``."""
        batches: Iterator[dict] = iter([micro_batches]) if isinstance(micro_batches, dict) else iter(micro_batches)
        c, state, engine = self.components, self.state, self.engine
        opt = self.config.optim
        lr = lr_at(state.step, opt.lr, opt.warmup_steps, self.total_steps, opt.min_lr)
        set_lr(engine.optimizer, lr)
        started, waited, skipped = time.perf_counter(), 0.0, False
        skipped_by_deepspeed = engine.skipped_steps
        sums: dict[str, torch.Tensor] = {}
        for _ in range(self.accumulation):
            t = time.perf_counter()
            batch = next(batches)
            waited += time.perf_counter() - t
            outputs = engine(*c.to_device(batch))
            text = scale_text_gradient(outputs["text_embeds"], engine.module, opt.text_lr_scale)
            loss = c.objective(outputs["image_embeds"], text, outputs["log_logit_scale"],
                               c.semantic_embeddings(batch, self.log), step=state.step)
            bad_term = self.nonfinite_term(loss)  # host sync (the one per micro-batch)
            if bad_term is not None:
                self.apply_nonfinite_policy(f"non-finite loss term '{bad_term}' at epoch {state.epoch}, batch "
                                            f"{state.batch_in_epoch}")
                # skip: a zero-valued loss over the parameters, so this batch adds an exact zero gradient
                total = sum((p * 0.0).sum() for p in engine.module.parameters() if p.requires_grad)
                skipped = True
            else:
                total = loss.total
                for name, value in {"total": loss.total.detach(), **loss.terms}.items():
                    sums[name] = sums.get(name, 0.0) + value.detach().float() / self.accumulation
            engine.backward(total)
            engine.step()  # DeepSpeed steps the optimizer (with clipping) at the accumulation boundary only
        if engine.skipped_steps > skipped_by_deepspeed and not skipped:
            # ZeRO's (and the bf16 optimizer's) overflow check found a non-finite gradient and left the weights
            # as they were: the step did nothing, so it is a skipped step under the same policy.
            self.apply_nonfinite_policy("non-finite gradient: DeepSpeed found an overflow and skipped the "
                                        "optimizer step")
            skipped = True
        # The forward clamp bounds the scale the loss uses; this keeps the STORED value (and ZeRO's fp32 master
        # copy) at most ln 100 too, so the temperature never freezes above the bound where the clamp passes no
        # gradient.
        clamp_logit_scale_(engine, engine.module.max_logit_scale)
        state.step += 1
        state.samples_seen += self.config.train.global_batch_size
        state.batch_in_epoch += self.accumulation
        state.skipped_steps += int(skipped)
        self.skips_in_a_row = self.skips_in_a_row + 1 if skipped else 0
        return StepResult(step=state.step, lr=lr, skipped=skipped,
                          epoch=state.epoch + state.batch_in_epoch / (self.steps_per_epoch * self.accumulation),
                          skipped_steps=state.skipped_steps, seconds=time.perf_counter() - started,
                          data_wait=waited, losses=sums, logit_scale=outputs["log_logit_scale"].detach().float())

    def nonfinite_term(self, loss) -> Optional[str]:
        """The first non-finite term of ``loss`` on any rank (all ranks get the same answer), or None: one
        reduction and one host read for all terms."""
        terms = {**loss.terms, "total": loss.total}
        flags = torch.stack([~torch.isfinite(v.detach()).all() for v in terms.values()]).float()
        if dist.is_initialized() and self.env.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        bad = [name for name, flag in zip(terms, flags.tolist()) if flag > 0]
        return bad[0] if bad else None

    def apply_nonfinite_policy(self, cause: str) -> None:
        """``train.nonfinite``: stop names the step and the cause; skip goes on, up to ``max_skipped_steps`` in a
        row."""
        cfg, step = self.config.train, self.state.step
        if cfg.nonfinite == "stop":
            raise NonFiniteLossError(f"step {step}: {cause}; set train.nonfinite=skip to skip such steps (at most "
                                     f"train.max_skipped_steps={cfg.max_skipped_steps} in a row)")
        if self.skips_in_a_row >= cfg.max_skipped_steps:
            raise NonFiniteLossError(f"step {step}: {cause}, after {self.skips_in_a_row} skipped steps in a row "
                                     f"(train.max_skipped_steps={cfg.max_skipped_steps})")
        self.log(f"step {step}: {cause}; skipped ({self.skips_in_a_row + 1} in a row)")

    def read_stats(self, steps: list[StepResult]) -> list[dict[str, float]]:
        """Each step's stats as host floats: the loss terms averaged over ranks (each rank holds its share of the
        global-batch loss), in ONE reduction and ONE host read for all ``steps``. Collective: all ranks call it
        at the same steps. The gradient norm is DeepSpeed's of the last step."""
        if not steps:
            return []
        names = sorted({name for s in steps for name in s.losses} | {"total"})
        device = self.components.device
        nan = torch.tensor(float("nan"), device=device)
        losses = torch.stack([torch.stack([torch.as_tensor(s.losses.get(n, nan), device=device).float()
                                           for n in names]) for s in steps])
        if dist.is_initialized() and self.env.world_size > 1:
            dist.all_reduce(losses)
            losses = losses / self.env.world_size
        log_scales = torch.stack([s.logit_scale.reshape(()) if s.logit_scale is not None else nan for s in steps])
        # exp(-log s) rather than 1 / s: a collapsed scale (s = 0) gives an infinite temperature, not a crash
        host = torch.cat([losses.flatten(), log_scales.exp(), (-log_scales).exp()]).tolist()
        n, k = len(steps), len(names)
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        out = []
        for i, s in enumerate(steps):
            stats = {f"loss/{name}": host[i * k + j] for j, name in enumerate(names)}
            stats.update({"train/lr": s.lr, "train/logit_scale": host[n * k + i],
                          "train/temperature": host[n * k + n + i], "train/grad_norm": grad_norm,
                          "train/epoch": s.epoch, "train/skipped_steps": s.skipped_steps})
            if self.components.objective.has_onset:  # the weight step s.step - 1 trained with
                stats["train/imsep_weight"] = self.components.objective.weights_at(s.step - 1)["imsep"]
            out.append(stats)
        return out

    # ------------------------------------------------------------------------------------------ around the step
    def log(self, message: str) -> None:
        if self.monitor is not None:
            self.monitor.info(message)
        elif self.env.is_main:
            print(message)

    def epoch_batches(self) -> Iterator[dict]:
        from alignclip.data import build_train_loader

        self.loader = build_train_loader(self.config, self.env.rank, self.env.world_size, self.state.epoch,
                                         start_batch=self.state.batch_in_epoch)
        return iter(self.loader)

    def data_counts_now(self) -> dict[str, float]:
        """The loader's counters (samples read; corrupt, missing or empty samples and bad shards skipped), summed
        over ranks (a collective: every rank logs at the same steps) and over this process's epochs."""
        from alignclip.data.pipeline import reduce_stats

        epoch = reduce_stats(self.loader.stats()) if self.loader is not None else {}
        return {f"data/{name}": float(self.data_counts.get(name, 0) + epoch.get(name, 0))
                for name in sorted(set(self.data_counts) | set(epoch)) if name != "batches"}

    def close_epoch_counts(self) -> None:
        """Fold the finished loader's counters into the run's; say so in train.log when samples were skipped."""
        if self.loader is None:
            return
        from alignclip.data.pipeline import reduce_stats

        epoch = reduce_stats(self.loader.stats())
        skipped = {k: v for k, v in epoch.items() if v and k not in ("samples_read", "batches", "wrapped_passes")}
        if skipped:
            self.log(f"data: epoch {self.state.epoch} skipped {skipped} (counted in TensorBoard as data/*)")
        for name, value in epoch.items():
            self.data_counts[name] = self.data_counts.get(name, 0) + value
        self.loader = None

    @torch.no_grad()
    def log_gap_metrics(self) -> dict[str, float]:
        """Live gap on the fixed held-out batch (rank 0): alignment, centroid distance, paired-cosine histogram,
        and in-batch retrieval R@1 (chance = 1 / batch) to show that the model learns the task, not only the gap."""
        if self.eval_batch is None:
            return {}
        from alignclip.analysis.metrics import alignment_score, centroid_distance, paired_cosines
        from alignclip.eval.retrieval import retrieval_metrics

        c = self.components
        model = c.model
        was_training = model.training
        model.eval()
        images = model.encode_image(self.eval_batch["image"].to(c.device, c.input_dtype), normalize=True).float().cpu()
        texts = model.encode_text(self.eval_batch["text"].to(c.device), normalize=True).float().cpu()
        model.train(was_training)
        if not (torch.isfinite(images).all() and torch.isfinite(texts).all()):
            # a diverged model: no metric is meaningful, and TensorBoard's histogram refuses non-finite values
            self.log(f"step {self.state.step}: non-finite embeddings on the held-out batch; gap metrics not logged")
            return {}
        retrieval = retrieval_metrics(images, texts, ks=(1,))
        gap = {"gap/alignment_score": alignment_score(images, texts),
               "gap/centroid_distance": centroid_distance(images, texts),
               **{f"gap/{k}": float(v) for k, v in retrieval.items()}}
        self.monitor.scalars(self.state.step, gap)
        cosines = np.asarray(paired_cosines(images, texts))
        self.monitor.histogram(self.state.step, "gap/paired_cosine", cosines[np.isfinite(cosines)])
        self.monitor.gap_plots(self.state.step, images, texts)
        return gap

    def finish(self, result: RunResult) -> RunResult:
        result.step = self.state.step
        if result.exit_code == 0 and self.monitor is not None:
            self.monitor.hparams(self.config, {**result.gap, **result.eval})
        self.close()
        return result

    def close(self) -> None:
        """Flush and close the monitor, restore the signal handlers (idempotent)."""
        if self.monitor is not None:
            self.monitor.flush()
            self.monitor.close()
        if self.preemption is not None:
            self.preemption.restore()


def train(config: Config, dist_env: Optional[DistEnv] = None) -> RunResult:
    """Run one training job (``Trainer(config, env).train()``); resume from the run directory if it has a
    checkpoint."""
    return Trainer(config, dist_env).train()
