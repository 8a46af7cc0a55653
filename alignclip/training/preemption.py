"""Preemption: a signal sets a flag; all ranks agree on it at a step boundary, save, and exit to be requeued.

Slurm sends the signal (``--signal=USR1@120`` ahead of the time limit, SIGTERM on preemption) to every task, but
not at the same instant: a rank that acted alone would leave the others blocked in the next collective. So the
handler only records the signal, and ``agree()`` (called by every rank after each optimizer step) takes the
MAX of the flag over ranks: one rank having seen it is enough for all to stop at the same step.

Exit code: ``REQUEUE_EXIT_CODE`` = 124 means "stopped cleanly at a checkpoint, requeue me". It is neither 0 (the
run finished) nor 1 (a failure); the Slurm scripts (slurm/) requeue the job on it, and the restarted command
resumes from the checkpoint just written.
"""

from __future__ import annotations

import signal
from typing import Iterable, Optional

import torch
import torch.distributed as dist

REQUEUE_EXIT_CODE = 124
PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


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

    def agree(self) -> bool:
        """True on every rank iff any rank has received a signal. Collective: all ranks must call it."""
        return any_rank(self.received is not None, self.device)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
