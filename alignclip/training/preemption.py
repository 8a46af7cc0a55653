"""Preemption: a signal sets a flag; all ranks agree on it at a step boundary, save, and exit to be requeued.

Slurm sends the signal (``--signal=USR1@120`` ahead of the time limit, SIGTERM on preemption) to every task, but
not at the same instant: a rank that acted alone would leave the others blocked in the next collective. So the
handler only records the signal, and ``agree()`` (called by every rank after each optimizer step) takes the
MAX of the flag over ranks: one rank having seen it is enough for all to stop at the same step.

Which signals: TERM (Slurm's preemption and ``scancel``), USR1 (``--signal=USR1@lead`` before the time limit),
USR2 (submitit's preemption signal), INT (Ctrl-C) and HUP (an ssh session that dropped), the tuple
``alignclip.distributed.process.PREEMPTION_SIGNALS``; how the loader workers are shielded from them lives there
too. Work that rank 0 does alone between steps (the periodic evaluation) reads the flag locally
(``PreemptionFlag.pending``) to end early, so the step's checkpoint is not delayed by it.

Exit code: ``REQUEUE_EXIT_CODE`` = 124 means "stopped cleanly at a checkpoint, requeue me". It is neither 0 (the
run finished) nor 1 (a failure); the Slurm scripts (slurm/) requeue the job on it, and the restarted command
resumes from the checkpoint just written.
"""

from __future__ import annotations

import signal
from typing import Iterable, Optional

import torch

from alignclip.distributed.process import PREEMPTION_SIGNALS, any_rank

REQUEUE_EXIT_CODE = 124


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
