"""The training loop's former home: ``train``, ``Trainer`` and ``RunResult`` live in ``alignclip.training.trainer``
(re-exported here so that ``from alignclip.training.loop import train`` keeps working)."""

from alignclip.training.trainer import NonFiniteLossError, RunResult, StepResult, Trainer, train

__all__ = ["NonFiniteLossError", "RunResult", "StepResult", "Trainer", "train"]
