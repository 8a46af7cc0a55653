"""The trainer: a run resolved once into a plan, its parts built once, and the loop. ``train(config)`` runs one job.

Reading order: ``Trainer.train`` (the loop, top to bottom: batches, stop check, step, the parts) -> ``Stepper.train_step``
(one optimizer step over its accumulation micro-batches) -> ``Trainer.__init__`` (the plan, the lock, the engine,
the resume, the parts). What is decided and checked before anything is built is ``alignclip.training.plan``; when
each part runs is the part's own business (``alignclip.training.parts``).

Host-device synchronisation. A step reads the device only where correctness needs it:
  * per micro-batch, ONE read of the loss terms' non-finite flags (MAX-reduced over ranks in the same call): the
    ``train.nonfinite`` policy must decide before ``backward`` whether this batch's gradient is replaced by zero,
    and every rank must take the same branch (the gradient all-reduce would otherwise mix a NaN into all ranks);
  * per step, the stop agreement (one all-reduce of [signal received, data source failed]): every rank stops at
    the same step;
  * DeepSpeed's skipped-step counter is a host integer (DeepSpeed reads its overflow flag inside ``engine.step``
    anyway, for its own skip decision), so checking it costs nothing.
Losses, the temperature and the gradient norm stay on the device and are read at log steps only, all steps of the
window in one reduction and one read (``read_stats``); the progress bar's loss is the last log step's.

Exits (``RunResult.exit_code``): 0 finished; 124 (``REQUEUE_EXIT_CODE``) stopped by a cause outside the model (a
preemption signal, a data source that failed, a lost peer) with the last completed step saved whenever the ranks
can still save together.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

import torch
import torch.distributed as dist

from alignclip import checkpoints
from alignclip.config import Config, run_dir_of
from alignclip.distributed.env import DistEnv, setup_distributed_env
from alignclip.distributed.process import any_rank, is_lost_peer
from alignclip.losses.temperature import clamp_logit_scale_
from alignclip.semantic import CaptionEmbeddings
from alignclip.training import checkpoint as ckpt
from alignclip.training import parts
from alignclip.training.components import Components, build_components, init_process_group
from alignclip.training.deepspeed_config import write_deepspeed_config
from alignclip.training.monitor import Monitor
from alignclip.training.optim import scale_text_gradient
from alignclip.training.plan import RunPlan, carried_position, record_config, resolve_plan, write_plan
from alignclip.training.preemption import REQUEUE_EXIT_CODE, PreemptionFlag
from alignclip.training.run_lock import RunLock, RunLockedError
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


class Stepper:
    """The optimizer step over built ``components``: the trainer's, and the benchmarks' (``Stepper(components,
    total_steps)``: no run directory, data, monitor or checkpoints) -- the same ``train_step``. ``captions``: where
    E_s comes from (the plan's source; default: the batches' own rows when the objective needs them)."""

    def __init__(self, components: Components, total_steps: int, state: Optional[checkpoints.TrainerState] = None,
                 steps_per_epoch: int = 0, log=print, captions: Optional[CaptionEmbeddings] = None):
        self.components = components
        self.captions = captions or CaptionEmbeddings("shards" if components.objective.needs_semantic else "none",
                                                      components.device, non_blocking=components.fast.non_blocking)
        self.config, self.env, self.engine = components.config, components.env, components.engine
        self.state = state or checkpoints.TrainerState(world_size=self.env.world_size,
                                                accumulation=components.layout.accumulation,
                                                text_lr_scale=self.config.optim.text_lr_scale)
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch or total_steps
        self.accumulation = components.layout.accumulation
        self.skips_in_a_row = 0
        self.log = log

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
                               self.captions(batch), step=state.step)
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


class Trainer:
    """One training job over a run directory: ``Trainer(config, env).train()``."""

    def __init__(self, config: Config, env: Optional[DistEnv] = None):
        from alignclip.training.flops import step_flops
        from alignclip.training.peaks import peak_tflops

        env = env or setup_distributed_env()
        device = init_process_group(config, env)
        self.preemption = PreemptionFlag(device=device)  # early: a signal during set-up must not kill the job
        self.lock = self.monitor = self.feed = None
        try:
            # the lock first: a second trainer on this run folder is refused at once, before the start-up count
            self.lock = self.take_lock(run_dir_of(config), env)
            # everything decided and checked before anything is built: a ConfigError names the key(s)
            self.plan = plan = resolve_plan(config, env)
            config, run_dir = plan.config, plan.run_dir
            if env.is_main:
                write_deepspeed_config(plan.step.ds_config, run_dir)
            components = build_components(plan.step)
            state = checkpoints.TrainerState(world_size=env.world_size, accumulation=plan.layout.accumulation,
                                      text_lr_scale=config.optim.text_lr_scale)
            # verified resume: the newest checkpoint whose manifest and load check out (older ones on failure,
            # loudly); stale .tmp folders of an interrupted save are removed first
            resumed = ckpt.resume(components.engine, run_dir, env.world_size, config.deepspeed.universal_checkpoint,
                                  plan.layout.accumulation, text_lr_scale=config.optim.text_lr_scale)
            self.latest = None
            if resumed is not None:
                self.latest, state = resumed
                if plan.resume.carry:
                    state = carried_position(state, plan.resume.saved_global_batch, plan)
            state.world_size = env.world_size
            if env.is_main:  # written only now: a refused or failed resume keeps the run's configs as they were
                record_config(config, run_dir)
                write_plan(plan)
            loss = config.loss  # E_s from the plan's source; an online encoder loads here, once
            captions = CaptionEmbeddings(plan.semantic.source, components.device, encoder=loss.semantic_model,
                                         batch_size=loss.semantic_batch_size, non_blocking=components.fast.non_blocking)
        except BaseException:
            self.close()
            raise
        self.stepper = Stepper(components, plan.total_steps, state, plan.steps_per_epoch, log=self.log,
                               captions=captions)
        self.components, self.engine, self.state, self.env = components, components.engine, state, env
        self.config, self.run_dir, self.total_steps = config, run_dir, plan.total_steps
        self.monitor = monitor = Monitor(run_dir, config.logging, env.is_main, plan.total_steps, state.step)
        try:  # from here a failure closes the monitor (its events reach disk) and restores the handlers
            monitor.run_config(config, state.step)
            self.report_start(plan, state)
            flops = step_flops(config, semantic_dim=plan.semantic.width or None)
            peak = peak_tflops(device, components.fast.precision, config.fast_path.peak_tflops)
            monitor.info(f"fast path: {components.fast.describe()}; {flops.total / 1e9:.4g} GFLOP per sample per "
                         f"step (model FLOPs), device peak "
                         f"{f'{peak:g} TFLOP/s' if peak else 'unknown (perf/mfu not logged; set fast_path.peak_tflops)'}")
            self.feed = parts.DataFeed(plan, state, self.log, stopping=self.preemption.pending)
            self.stop_check = parts.StopCheck(self.preemption, device)
            self.logger = parts.StepLogger(plan, self.stepper, monitor, self.feed, flops.total, peak)
            self.checkpointer = parts.Checkpointer(plan, self.engine, state, monitor)
            # the periodic parts in the order they act after a step; each decides when it is due
            self.parts = [parts.Evaluator(plan, components.model, monitor, self.preemption, state), self.logger,
                          parts.GapMonitor(plan, components, monitor, state, self.log),
                          parts.ProgressBar(monitor, self.logger), self.checkpointer]
        except BaseException:
            self.close()
            raise

    def take_lock(self, run_dir: Path, env: DistEnv) -> Optional[RunLock]:
        """Rank 0 locks the run directory; every rank learns whether it could (one collective)."""
        lock, refusal = None, None
        if env.is_main:
            try:
                lock = RunLock.acquire(run_dir, warn=lambda m: print(m, flush=True))
            except RunLockedError as err:
                refusal = err
        if any_rank(refusal is not None, self.preemption.device):
            raise refusal or RunLockedError(f"run directory {run_dir} is in use by another trainer (see rank 0)")
        return lock

    def report_start(self, plan: RunPlan, state: checkpoints.TrainerState) -> None:
        mon, layout, env = self.monitor, plan.layout, plan.step.env
        if self.latest is not None:
            mon.info(f"resumed from {self.latest} at step {state.step} (epoch {state.epoch}, batch "
                     f"{state.batch_in_epoch})")
            if plan.resume.legacy_norm_eps:
                mon.info("the run predates model.norm_eps: its LayerNorms keep the eps it trained with "
                         "(1e-6 in the blocks, 1e-5 in the stem and final norms)")
            for change in plan.resume.changes:
                mon.info(f"config changed since the checkpoint: {change.describe()}"
                         + (" (carried: the position is kept in samples seen)" if change.kind != "free" else ""))
        mon.info(f"run {plan.run_dir}: world {env.world_size} ({env.source}), {plan.step.device}, global batch "
                 f"{layout.global_batch} = {layout.micro_batch} x {layout.accumulation} x {env.world_size}, "
                 f"{plan.steps_per_epoch} steps/epoch, {plan.total_steps} steps, "
                 f"zero stage {self.config.deepspeed.zero_stage}; plan in {plan.run_dir / 'plan.yaml'}")
        if env.is_main:  # the whole plan in train.log (the console gets the lines above and below)
            mon.log.info("plan:\n" + plan.describe().rstrip())
        mon.info(f"data: {plan.data.epoch.samples_per_epoch} samples per epoch in {len(plan.data.shards)} shards; "
                 f"caption embeddings: {plan.semantic.source}"
                 + (f" ({plan.semantic.width} wide)" if plan.semantic.width else ""))

    # ------------------------------------------------------------------------------------------------ the loop
    def train(self) -> RunResult:
        """Train until ``total_steps`` or a stop (signal, failed data source, lost peer): exit 124 after saving."""
        state = self.state
        result = RunResult(0, state.step, self.run_dir, self.latest)
        try:
            while state.step < self.total_steps:
                batches, data_failure = self.feed.next_step()
                stop = self.stop_check.check(data_failure)  # collective: every rank stops at the same step
                if stop is not None:
                    return self.stop(stop, result)
                step = self.stepper.train_step(batches)
                for part in self.parts:
                    part.after_step(step, state.step == self.total_steps, result)
            self.feed.fold_counts()
            self.monitor.info(f"done: {state.step} steps, {state.samples_seen} samples; checkpoint "
                              f"{result.checkpoint}")
            return self.finish(result)
        except (RuntimeError, OSError) as err:
            if not is_lost_peer(err):  # any collective of the step, the parts or the save
                self.close()
                raise
            return self.stop(parts.Stop.lost_peer(err), result)
        except BaseException:
            self.close()
            raise

    def stop(self, stop: parts.Stop, result: RunResult) -> RunResult:
        """Save the last completed step (all ranks) and exit 124; a lost peer leaves the last checkpoint."""
        self.feed.close()  # shuts the loader's workers down (they ignore the signals) before the save
        if stop.save:
            self.logger.flush(result)
            result.checkpoint = self.checkpointer.save_now()
            saved = f"saved {result.checkpoint} at step {self.state.step}"
        else:
            saved = (f"nothing saved (the ranks cannot save together); the last checkpoint is "
                     f"{result.checkpoint or self.latest}")
        self.monitor.info(f"{stop.cause}: {saved}; exiting with {REQUEUE_EXIT_CODE} to be requeued")
        result.exit_code = REQUEUE_EXIT_CODE
        return self.finish(result)

    def train_step(self, micro_batches: Union[dict, Iterable[dict]]) -> StepResult:
        """One step by hand (tests, notebooks): ``Stepper.train_step`` over this trainer's state."""
        return self.stepper.train_step(micro_batches)

    def read_stats(self, steps: list[StepResult]) -> list[dict[str, float]]:
        return self.stepper.read_stats(steps)

    def log(self, message: str) -> None:
        if self.monitor is not None:
            self.monitor.info(message)
        elif self.env.is_main:
            print(message)

    def finish(self, result: RunResult) -> RunResult:
        result.step = self.state.step
        if result.exit_code == 0 and self.monitor is not None:
            self.monitor.hparams(self.config, {**result.gap, **result.eval})
        self.close()
        return result

    def close(self) -> None:
        """Flush and close the monitor, stop the loader, release the lock, restore the handlers (idempotent)."""
        if self.feed is not None:
            self.feed.close()
        if self.monitor is not None:
            self.monitor.flush()
            self.monitor.close()
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if self.preemption is not None:
            self.preemption.restore()


def train(config: Config, dist_env: Optional[DistEnv] = None) -> RunResult:
    """Run one training job (``Trainer(config, env).train()``); resume from the run directory if it has a
    checkpoint."""
    return Trainer(config, dist_env).train()
