"""Preemption: a signal sets a flag; all ranks agree on it at a step boundary, save, and exit to be requeued.

Slurm sends the signal (``--signal=USR1@120`` ahead of the time limit, SIGTERM on preemption) to every task, but
not at the same instant: a rank that acted alone would leave the others blocked in the next collective. So the
handler only records the signal, and ``agree()`` (called by every rank after each optimizer step) takes the
MAX of the flag over ranks: one rank having seen it is enough for all to stop at the same step.

Which signals: TERM (Slurm's preemption and ``scancel``), USR1 (``--signal=USR1@lead`` before the time limit),
USR2 (submitit's preemption signal) and INT (Ctrl-C). Slurm and ``kill -TERM -- -PGID`` signal every process of the
step, the DataLoader workers included; PyTorch's worker would die on SIGTERM (its own handler re-raises it) and the
trainer would then fail with "DataLoader worker ... killed by signal". So the workers ignore these signals
(``ignore_preemption_signals``, the ``worker_init_fn`` of the training loader and of the evaluation's loaders) and
start with them blocked (``preemption_signals_blocked``): only the trainer acts, and it shuts its workers down after
the save. Work that rank 0 does alone between steps (the periodic evaluation) reads the flag locally
(``PreemptionFlag.pending``) to end early, so the step's checkpoint is not delayed by it.

Exit code: ``REQUEUE_EXIT_CODE`` = 124 means "stopped cleanly at a checkpoint, requeue me". It is neither 0 (the
run finished) nor 1 (a failure); the Slurm scripts (slurm/) requeue the job on it, and the restarted command
resumes from the checkpoint just written.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import multiprocessing.util
import os
import signal
import sys
import weakref
from typing import Iterable, Iterator, Optional

import torch
import torch.distributed as dist

REQUEUE_EXIT_CODE = 124
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)
_PR_SET_PDEATHSIG = 1  # linux/prctl.h

_shielded_workers: weakref.WeakSet = weakref.WeakSet()  # this process's workers started by the block below
_reaper_pid: Optional[int] = None  # the process that registered the exit-time kill (a fork registers its own)


@contextlib.contextmanager
def preemption_signals_blocked() -> Iterator[None]:
    """Hold the preemption signals pending in this thread while it starts the DataLoader's workers.

    A worker forked with them blocked inherits the mask, so a signal that reaches it before its
    ``worker_init_fn`` runs (PyTorch's own SIGTERM handler is installed first, and would kill it) waits, and is
    discarded when ``ignore_preemption_signals`` ignores it. Under load that window is wide enough to be hit: a
    scancel to the whole step killed a just-forked worker and failed the trainer. Here, a signal for the trainer
    is delivered to it as soon as the block ends (or at once, through a thread that does not block it).

    The processes started inside are killed at this process's exit if still alive: see ``_kill_shielded_workers``.
    """
    global _reaper_pid
    before = set(multiprocessing.active_children())
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPTION_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        started = set(multiprocessing.active_children()) - before
        if started and _reaper_pid != os.getpid():
            _shielded_workers.clear()  # a forked copy of the parent's set: not this process's children
            # multiprocessing's exit (atexit in a main process, the end of a multiprocessing child) runs the
            # finalizers of priority >= 0 first, then terminate()s and joins the daemonic children
            multiprocessing.util.Finalize(None, _kill_shielded_workers, exitpriority=0)
            _reaper_pid = os.getpid()
        _shielded_workers.update(started)


def _kill_shielded_workers() -> None:
    """SIGKILL the workers started inside ``preemption_signals_blocked`` that are still alive; run at exit.

    Ignoring SIGTERM, such a worker defeats multiprocessing's exit, which ``terminate()``s the daemonic children
    still alive and then joins them without a timeout: the process would never end. A loader normally shuts its
    workers down first (end of the epoch, the trainer after a preemption's save), but not when its iterator lives
    on in an exception's traceback (a crash; the loader raising a worker's error keeps it in its own frames), nor
    a worker stuck in a read past the DataLoader's shutdown timeout."""
    for process in list(_shielded_workers):
        try:
            if process.is_alive():
                process.kill()
        except ValueError:  # a Process object already closed: nothing left to kill
            pass


def ignore_preemption_signals(worker_id: int = 0) -> None:
    """``worker_init_fn`` of the training and evaluation DataLoaders: the worker ignores the preemption signals,
    so the trainer alone decides (and shuts the worker down after saving); one that arrived earlier, held pending
    by ``preemption_signals_blocked``, is discarded as the worker unblocks them.

    Ignoring SIGTERM also defeats the DataLoader's last-resort ``terminate()`` of a worker that does not exit, so
    on Linux the worker asks the kernel for SIGKILL when its parent (the trainer) dies: no orphaned worker
    outlives the job, even one blocked in a read. It defeats multiprocessing's exit-time ``terminate()`` too:
    started inside ``preemption_signals_blocked``, the worker is killed at its parent's exit instead.
    """
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, PREEMPTION_SIGNALS)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass  # no prctl: Slurm's end-of-job SIGKILL and PyTorch's parent watchdog remain


def any_rank(flag: bool, device: str | torch.device = "cpu") -> bool:
    """The MAX of a boolean over all ranks (the same answer everywhere). Collective when the world has > 1 rank."""
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


class PreemptionFlag:
    """Install handlers for ``signals``; ``agree()`` is the collective decision; ``restore()`` undoes the handlers."""

    def __init__(self, signals: Iterable[signal.Signals] = PREEMPTION_SIGNALS, device: str | torch.device = "cpu"):
        self.received: Optional[int] = None
        self.device = torch.device(device)  # NCCL reduces CUDA tensors only
        self._previous = {sig: signal.signal(sig, self._handle) for sig in signals}

    def _handle(self, signum, frame) -> None:
        self.received = signum  # only record: the loop acts at the next step boundary

    def describe(self) -> str:
        if self.received is None:
            return "signal received by another rank"
        return f"{signal.Signals(self.received).name} received by this rank"

    def pending(self) -> bool:
        """True once THIS rank has received a signal. A local read, no collective: for work one rank does alone
        and may cut short (the periodic evaluation on rank 0); whether to stop is still ``agree()``'s decision."""
        return self.received is not None

    def agree(self) -> bool:
        """True on every rank iff any rank has received a signal. Collective: all ranks must call it."""
        return any_rank(self.received is not None, self.device)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
