"""Process plumbing in one place: which signals mean "stop", how loader workers are shielded from them, and the
rank / world / barrier / any-rank helpers over the default process group (``is_distributed``).

Used downward by training/, data/ and eval/. Nothing here knows about models, data or checkpoints.

Signals. Slurm sends the preemption signal (``--signal=USR1@120`` ahead of the time limit, SIGTERM on preemption)
to every process of the step, the DataLoader workers included; submitit uses USR2, Ctrl-C is INT, and a dropped
ssh session without nohup/tmux is HUP. PyTorch's worker would die on SIGTERM (its own handler re-raises it) and the
trainer would then fail with "DataLoader worker ... killed by signal". So the workers ignore these signals
(``ignore_preemption_signals``, the ``worker_init_fn`` of every loader) and start with them blocked
(``preemption_signals_blocked``): only the trainer acts, and it shuts its workers down after its save.

Dead workers. PyTorch's SIGCHLD handler raises "DataLoader worker ... killed by signal" from inside whatever the
main thread runs at that instant (a forward, an optimizer step, a collective). ``worker_failures_at_next_batch``
turns that off: the loader finds the dead worker when it next waits for a batch (within 5 s,
``MP_STATUS_CHECK_INTERVAL``) and raises there, where the trainer can save the step it finished.
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
from typing import Iterator, Optional

import torch
import torch.distributed as dist

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1  # linux/prctl.h

_shielded_workers: weakref.WeakSet = weakref.WeakSet()  # this process's workers started by the block below
_reaper_pid: Optional[int] = None  # the process that registered the exit-time kill (a fork registers its own)


# ----------------------------------------------------------------------------------------- ranks
def is_distributed() -> bool:
    """True when a default process group is up (possibly of one rank)."""
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when none is initialised."""
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank() -> int:
    return rank_and_world()[0]


def world_size() -> int:
    return rank_and_world()[1]


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def any_rank(flag: bool, device: str | torch.device = "cpu") -> bool:
    """The MAX of a boolean over all ranks (the same answer everywhere). Collective when the world has > 1 rank."""
    return any_rank_of([flag], device)[0]


def any_rank_of(flags: list[bool], device: str | torch.device = "cpu") -> list[bool]:
    """Element-wise MAX of booleans over all ranks, in ONE all-reduce. Collective when the world has > 1 rank."""
    value = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    if world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return [v > 0 for v in value.tolist()]


# What the collective backends say when a peer is gone: gloo's transport ("Connection closed by peer", a
# timeout after train.collective_timeout_s) and NCCL's (its watchdog usually aborts the process first).
_LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "Timed out", "timed out", "NCCL communicator")


def is_lost_peer(err: Optional[BaseException]) -> bool:
    """True for a collective that failed because another rank vanished or did not answer in time (also when it
    is the cause of another error, e.g. a checkpoint write that failed in its barrier)."""
    while err is not None:
        if isinstance(err, (dist.DistNetworkError, dist.DistBackendError)):
            return True
        if isinstance(err, RuntimeError) and any(text in str(err) for text in _LOST_PEER):
            return True
        err = err.__cause__
    return False


# ----------------------------------------------------------------------------------------- signals
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
        if started:
            worker_failures_at_next_batch()


def worker_failures_at_next_batch() -> None:
    """Undo PyTorch's SIGCHLD handler (installed once per process, when the first loader starts its workers), so
    a killed worker is reported by the loader's next wait for a batch, not raised into arbitrary main-thread code
    (see the module docstring). Main thread only (signal handlers can be set nowhere else)."""
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)


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
