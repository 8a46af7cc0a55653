"""AdamW with OpenCLIP-style parameter groups: weight decay on matrices only.

Exempt from decay: every parameter that is effectively one-dimensional (biases, LayerNorm gains, a class token
stored as [1, 1, d]) and the logit scale. Decaying a gain or a bias pulls it towards zero for no regularising
benefit; decaying the logit scale would pull the temperature towards 1.
"""

from __future__ import annotations

import torch
from torch import nn

from alignclip.config import OptimConfig


def is_decay_exempt(name: str, param: torch.Tensor) -> bool:
    effective_dims = sum(1 for size in param.shape if size > 1)
    return effective_dims < 2 or "logit_scale" in name or name.endswith(".bias")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if is_decay_exempt(name, param) else decay).append(param)
    return [dict(params=decay, weight_decay=weight_decay, name="decay"),
            dict(params=no_decay, weight_decay=0.0, name="no_decay")]


def build_optimizer(model: nn.Module, optim: OptimConfig, impl: str | None = None) -> torch.optim.AdamW:
    """AdamW(beta1, beta2, eps) over the two groups; the lr is set each step from ``schedule.lr_at``.

    ``impl`` is the resolved ``optim.adamw_impl`` (alignclip.training.fast_path): fused | foreach | loop, or None for
    torch's default; the arithmetic is the same (the tests compare them), only the number of kernels differs."""
    from alignclip.training.fast_path import adamw_kwargs

    return torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=optim.lr,
                             betas=(optim.beta1, optim.beta2), eps=optim.eps,
                             **(adamw_kwargs(impl) if impl else {}))
