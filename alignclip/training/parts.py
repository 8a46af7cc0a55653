"""The parts of a training run around the step, each built once from the run plan and owning its own schedule.

The loop (``Trainer.train``) only asks: the next step's batches (``DataFeed``), whether to stop (``StopCheck``),
the step itself (``Stepper``, in trainer.py), then ``after_step`` of every periodic part in order. When a part runs
is its own business (``should_run(step, last)``): the loop never reads a period.

    part             schedule                                    collective
    Evaluator        eval.every_steps and the last step (rank 0)  no (rank 0 alone; a pending signal ends it)
    StepLogger       logging.log_every_steps, the last step       yes (one reduction of the window's losses)
    GapMonitor       logging.gap_every_steps, the last step       no (rank 0)
    ProgressBar      every step                                    no
    Checkpointer     checkpoint.every_steps, the last step         yes (every rank saves)
    StopCheck        every step, before it                         yes (one all-reduce of [signal, data failed])

Adding a periodic task: a class with ``after_step(step, result)`` (and ``should_run`` from ``Periodic``),
appended to the list ``Trainer.__init__`` builds; the loop does not change (docs/architecture.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch

from alignclip import checkpoints
from alignclip.distributed.process import any_rank_of
from alignclip.training import checkpoint as ckpt
from alignclip.training.monitor import memory_gb


@dataclass
class Periodic:
    """Due every ``every`` steps (0: never periodically) and, with ``at_last``, at the run's last step."""

    every: int
    at_last: bool = True

    def should_run(self, step: int, last: bool) -> bool:
        return (self.every > 0 and step % self.every == 0) or (last and self.at_last)


# ------------------------------------------------------------------------------------------------ data
class DataFeed:
    """The step's micro-batches, epoch after epoch, from the plan's ``TrainData`` (built once): a new loader per
    epoch at the position the state says. A data source that fails (``DataSourceError``) is returned as a cause,
    so that every rank can agree on it before anyone starts a collective. Once ``stopping()`` is true (a
    preemption signal pending here) it fetches nothing: the run stops before the next step whatever the data does,
    and a stalled source must not hold the save back."""

    def __init__(self, plan, state: checkpoints.TrainerState, log, stopping=lambda: False):
        self.plan, self.state, self.log, self.stopping = plan, state, log, stopping
        self.accumulation = plan.layout.accumulation
        self.epoch_batches = plan.data.epoch.batches_per_epoch
        self.loader = None  # this epoch's TrainLoader
        self.batches: Optional[Iterator[dict]] = None
        self.counts: dict = {}  # loader counters of the finished epochs

    def next_step(self) -> tuple[list[dict], Optional[str]]:
        """(the ``accumulation`` micro-batches of the next step, None), or ([], the failure's one-line cause)."""
        from alignclip.data.pipeline import DataSourceError

        if self.stopping():
            return [], None
        if self.state.batch_in_epoch >= self.epoch_batches:
            self.end_epoch()
        if self.batches is None:
            self.start_epoch()
        try:
            return [next(self.batches) for _ in range(self.accumulation)], None
        except DataSourceError as err:
            return [], err.cause

    def start_epoch(self) -> None:
        from alignclip.data import build_train_loader

        env = self.plan.step.env
        self.loader = build_train_loader(self.plan.config, env.rank, env.world_size, self.state.epoch,
                                         start_batch=self.state.batch_in_epoch, data=self.plan.data,
                                         pin_memory=self.plan.step.fast.pin_memory)
        self.batches = iter(self.loader)

    def end_epoch(self) -> None:
        """The epoch is over: its counters into the run's, then the next epoch."""
        self.fold_counts()
        self.state.epoch, self.state.batch_in_epoch = self.state.epoch + 1, 0

    def fold_counts(self) -> None:
        """Fold this loader's counters into the run's (train.log names skipped samples) and stop it; at the end
        of an epoch and of the run. Collective (every rank at the same step)."""
        from alignclip.data.pipeline import reduce_stats

        if self.loader is not None:
            epoch = reduce_stats(self.loader.stats())
            skipped = {k: v for k, v in epoch.items()
                       if v and k not in ("samples_read", "batches", "wrapped_passes")}
            if skipped:
                self.log(f"data: epoch {self.state.epoch} skipped {skipped} (counted in TensorBoard as data/*)")
            for name, value in epoch.items():
                self.counts[name] = self.counts.get(name, 0) + value
        self.close()

    def counts_now(self) -> dict[str, float]:
        """The loader's counters summed over ranks (collective) and over this process's epochs."""
        from alignclip.data.pipeline import reduce_stats

        epoch = reduce_stats(self.loader.stats()) if self.loader is not None else {}
        return {f"data/{name}": float(self.counts.get(name, 0) + epoch.get(name, 0))
                for name in sorted(set(self.counts) | set(epoch)) if name != "batches"}

    def close(self) -> None:
        """Stop the loader's workers (they ignore the preemption signals: the trainer shuts them down)."""
        if self.batches is not None and hasattr(self.batches, "close"):
            self.batches.close()
        self.loader, self.batches = None, None


# ------------------------------------------------------------------------------------------------ stop
@dataclass(frozen=True)
class Stop:
    cause: str  # one line
    save: bool = True  # False: the ranks cannot save together any more (a lost peer)

    @classmethod
    def lost_peer(cls, err: BaseException) -> "Stop":
        """A collective failed because another rank vanished or passed ``train.collective_timeout_s``."""
        return cls(f"lost a peer rank ({str(err).splitlines()[0][:200]})", save=False)


class StopCheck:
    """Before every step: did any rank receive a preemption signal, or see its data source fail? One all-reduce
    of both flags, so every rank stops at the same step, saves it together and exits 124."""

    def __init__(self, preemption, device):
        self.preemption, self.device = preemption, device

    def check(self, data_failure: Optional[str]) -> Optional[Stop]:
        signalled, failed = any_rank_of([self.preemption.pending(), data_failure is not None], self.device)
        if data_failure is not None:
            return Stop(f"data source failed on this rank: {data_failure}")
        if failed:
            return Stop("data source failed on another rank")
        if signalled:
            return Stop(f"preempted ({self.preemption.describe()})")
        return None


# ------------------------------------------------------------------------------------------- periodic
class Evaluator(Periodic):
    """The ``eval`` section on rank 0; a pending preemption ends it at its next batch, without figures."""

    def __init__(self, plan, model, monitor, preemption, state):
        cfg = plan.config
        super().__init__(cfg.eval.every_steps, at_last=cfg.eval.every_steps > 0)
        self.config, self.model, self.monitor, self.preemption, self.state = cfg, model, monitor, preemption, state
        self.enabled = plan.step.env.is_main and cfg.eval.every_steps > 0

    def after_step(self, step_result, last: bool, result) -> None:
        if self.enabled and self.should_run(step_result.step, last):
            result.eval = self.evaluate() or result.eval

    def evaluate(self) -> dict[str, float]:
        from alignclip.eval.benchmark import EvaluationStopped, evaluate_during_training

        try:
            figures = evaluate_during_training(self.model, self.config, should_stop=self.preemption.pending)
        except EvaluationStopped as stop:
            self.monitor.info(f"evaluation at step {self.state.step} stopped {stop}: preemption pending "
                              f"({self.preemption.describe()}); no eval figures for this step")
            return {}
        return self.monitor.evaluation(self.state.step, figures)


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


class StepLogger(Periodic):
    """Losses, lr, throughput, memory and data counters every ``logging.log_every_steps`` (and before a stop):
    the window's steps read in one collective."""

    def __init__(self, plan, stepper, monitor, feed: DataFeed, flops_per_sample: float,
                 peak_tflops: Optional[float]):
        super().__init__(plan.config.logging.log_every_steps)
        self.stepper, self.monitor, self.feed = stepper, monitor, feed
        self.global_batch, self.world = plan.layout.global_batch, plan.step.env.world_size
        self.flops_per_sample, self.peak_tflops = flops_per_sample, peak_tflops
        self.window, self.pending = ThroughputWindow(), []
        self.shown: dict = {}  # the progress bar's figures, as of the last log step

    def after_step(self, step_result, last: bool, result) -> None:
        self.window.add(step_result.seconds, step_result.data_wait)
        self.pending.append(step_result)
        if self.should_run(step_result.step, last):
            self.flush(result)

    def flush(self, result) -> None:
        if not self.pending:
            return
        per_step = self.stepper.read_stats(self.pending)
        result.losses += [(s.step, stats["loss/total"]) for s, stats in zip(self.pending, per_step)]
        stats = {**per_step[-1], **self.window.rates(self.global_batch, self.world, self.flops_per_sample,
                                                     self.peak_tflops)}
        self.monitor.scalars(self.pending[-1].step, {**stats, **memory_gb(), **self.feed.counts_now()})
        self.shown = {"loss": stats["loss/total"], "lr": stats["train/lr"],
                      **{short: stats[tag] for short, tag in _BAR_RATES.items() if tag in stats}}
        self.window, self.pending = ThroughputWindow(), []


class GapMonitor(Periodic):
    """Live gap on the fixed held-out batch (rank 0) every ``logging.gap_every_steps``: alignment, centroid
    distance, paired-cosine histogram and in-batch retrieval R@1 (chance = 1 / batch)."""

    def __init__(self, plan, components, monitor, state, log):
        from alignclip.data import build_eval_batch

        cfg = plan.config
        super().__init__(cfg.logging.gap_every_steps)
        self.components, self.monitor, self.state, self.log = components, monitor, state, log
        self.batch = build_eval_batch(cfg, cfg.logging.gap_batch_size) if plan.step.env.is_main else None

    def after_step(self, step_result, last: bool, result) -> None:
        if self.should_run(step_result.step, last):
            result.gap = self.measure()

    @torch.no_grad()
    def measure(self) -> dict[str, float]:
        if self.batch is None:
            return {}
        from alignclip.analysis.metrics import alignment_score, centroid_distance, paired_cosines
        from alignclip.eval.retrieval import retrieval_metrics

        c = self.components
        model = c.model
        was_training = model.training
        model.eval()
        images = model.encode_image(self.batch["image"].to(c.device, c.input_dtype), normalize=True).float().cpu()
        texts = model.encode_text(self.batch["text"].to(c.device), normalize=True).float().cpu()
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


class ProgressBar:
    """The console bar, every step, with the logger's last figures."""

    def __init__(self, monitor, logger: StepLogger):
        self.monitor, self.logger = monitor, logger

    def after_step(self, step_result, last: bool, result) -> None:
        self.monitor.advance(step_result.step, self.logger.shown)


class Checkpointer(Periodic):
    """Step checkpoints every ``checkpoint.every_steps``, at the last step, and on a stop (``save_now``). Each
    holds the run's config (the resume checks compare it with the next session's)."""

    def __init__(self, plan, engine, state, monitor):
        from alignclip.config import to_yaml

        cfg = plan.config
        super().__init__(cfg.checkpoint.every_steps)
        self.engine, self.state, self.monitor, self.run_dir, self.keep = engine, state, monitor, plan.run_dir, \
            cfg.checkpoint.keep
        self.config_bytes = to_yaml(cfg).encode()

    def after_step(self, step_result, last: bool, result) -> None:
        if self.should_run(step_result.step, last):
            result.checkpoint = self.save_now()

    def save_now(self):
        path = ckpt.save_checkpoint(self.engine, self.run_dir, self.state, self.keep,
                                    extra={checkpoints.CONFIG_FILE: self.config_bytes})
        self.monitor.flush()
        return path
