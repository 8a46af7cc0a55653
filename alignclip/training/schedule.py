"""Learning-rate schedule: linear warmup then cosine decay, a pure function of the step.

Being a function of the step alone (no scheduler object with state), a resumed run needs nothing but the step to
continue its schedule exactly.
"""

from __future__ import annotations

import math


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """The learning rate used for optimizer step ``step`` (0-based).

    warmup (step < W):  base * (step + 1) / W                       (reaches base at the last warmup step)
    cosine (step >= W): min + (base - min) * 1/2 (1 + cos(pi * (step - W) / (T - W)))
    and ``min_lr`` from step T on. As OpenCLIP's ``cosine_lr``, plus a floor.
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 0 or step >= total_steps:
        return min_lr if decay_steps > 0 else base_lr
    progress = (step - warmup_steps) / decay_steps
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer, lr: float) -> None:
    """Write ``lr`` times the group's ``lr_scale`` (optim.py: 1, or optim.text_lr_scale for the text-only
    parameters) into every parameter group (DeepSpeed's wrapped optimizers expose ``param_groups`` too)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
