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


# ContrastiveModel's text-only modules (SharedCLIP has only the stem: its trunk serves both modalities)
TEXT_ONLY_PREFIXES = ("text_stem.", "text_trunk.")


# The group hyper-parameters this run's config sets. Loading a checkpoint restores each group's values as saved
# (torch's Optimizer.load_state_dict, DeepSpeed's universal load); these are put back to the config's afterwards.
CONFIGURED_GROUP_KEYS = ("lr_scale", "weight_decay", "betas", "eps")


def splits_text_groups(text_lr_scale: float) -> bool:
    """Whether the text-only parameters get groups of their own: the optimizer's group layout, which a checkpoint's
    optimizer state must match."""
    return text_lr_scale != 1.0


def param_groups(model: nn.Module, weight_decay: float, text_lr_scale: float = 1.0) -> list[dict]:
    """The decay and no-decay groups, each with the ``lr_scale`` that ``schedule.set_lr`` multiplies the step's lr
    by: 1, and with ``text_lr_scale`` below 1 two more groups of the text-only parameters at that scale."""
    split = splits_text_groups(text_lr_scale)
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {(False, False): [], (True, False): []}
    for name, param in model.named_parameters():
        if param.requires_grad:
            text = split and name.startswith(TEXT_ONLY_PREFIXES)
            groups.setdefault((is_decay_exempt(name, param), text), []).append(param)
    return [dict(params=params, weight_decay=0.0 if exempt else weight_decay, lr_scale=text_lr_scale if text else 1.0,
                 name=("no_decay" if exempt else "decay") + ("_text" if text else ""))
            for (exempt, text), params in groups.items()]


def scale_text_gradient(text_embeds: torch.Tensor, model: nn.Module, text_lr_scale: float) -> torch.Tensor:
    """The text embeddings unchanged, their gradient times ``text_lr_scale`` when the model shares parameters
    between the modalities (SharedCLIP): the shared trunk then learns from the text path at that fraction. The
    text-only parameters need no such scaling (Adam divides any constant factor out); their groups' lr does it."""
    if text_lr_scale == 1.0 or not getattr(model, "shared_trunk", False):
        return text_embeds
    return text_embeds * text_lr_scale + text_embeds.detach() * (1.0 - text_lr_scale)


def build_optimizer(model: nn.Module, optim: OptimConfig, impl: str | None = None) -> torch.optim.AdamW:
    """AdamW(beta1, beta2, eps) over the two groups; the lr is set each step from ``schedule.lr_at``.

    ``impl`` is the resolved ``optim.adamw_impl`` (alignclip.training.fast_path): fused | foreach | loop, or None for
    torch's default; the arithmetic is the same (the tests compare them), only the number of kernels differs."""
    from alignclip.training.fast_path import adamw_kwargs

    return torch.optim.AdamW(param_groups(model, optim.weight_decay, optim.text_lr_scale), lr=optim.lr,
                             betas=(optim.beta1, optim.beta2), eps=optim.eps,
                             **(adamw_kwargs(impl) if impl else {}))


def group_settings(optimizer) -> list[dict]:
    """Each parameter group's ``CONFIGURED_GROUP_KEYS`` (DeepSpeed's wrapped optimizers expose ``param_groups``)."""
    return [{k: group[k] for k in CONFIGURED_GROUP_KEYS if k in group} for group in optimizer.param_groups]


def restore_group_settings(optimizer, settings: list[dict]) -> None:
    """Write ``group_settings``' values back, group by group (the layout is the same: the groups are in order)."""
    if len(settings) != len(optimizer.param_groups):
        raise RuntimeError(f"the optimizer has {len(optimizer.param_groups)} parameter groups, expected "
                           f"{len(settings)}")
    for group, values in zip(optimizer.param_groups, settings):
        group.update(values)
