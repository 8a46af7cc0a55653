"""Keeping the stored logit scale at most ln 100 under DeepSpeed ZeRO with bf16.

The model clamps in its forward (``logit_scale.clamp(max=...)``), so the scale the loss USES never exceeds
``model.max_logit_scale``. The STORED value can still drift above it, and then the clamp passes no gradient, so the
temperature freezes there. OpenCLIP clamps the parameter in place after each step; under ZeRO (and DeepSpeed's
bf16) that alone does not stick: the module holds a bf16 copy, and the optimizer's fp32 master weight, which still
holds the unclamped value, is copied back over it at the next step. ``clamp_logit_scale_`` clamps both.
"""

from __future__ import annotations

import torch
from torch import nn


def _module_of(engine_or_model) -> nn.Module:
    return getattr(engine_or_model, "module", engine_or_model)


def clamp_logit_scale_(engine_or_model, max_value: float, name: str = "logit_scale") -> None:
    """Clamp ``<module>.<name>`` to at most ``max_value`` in place, and its fp32 master copy when a DeepSpeed
    optimizer holds one (ZeRO 1/2/3, bf16). Call it on EVERY rank after ``engine.step()``: under ZeRO each rank
    owns a fragment of the master weights and sets its own."""
    param = getattr(_module_of(engine_or_model), name)
    with torch.no_grad():
        param.clamp_(max=max_value)
    if hasattr(param, "_hp_mapping") or hasattr(param, "ds_id"):  # a parameter under a DeepSpeed optimizer
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        master = safe_get_full_fp32_param(param)
        if master is not None:
            safe_set_full_fp32_param(param, master.clamp(max=max_value))


def stored_logit_scale(engine_or_model, name: str = "logit_scale") -> float:
    """The stored value: the fp32 master copy under DeepSpeed when there is one, else the module's parameter."""
    param = getattr(_module_of(engine_or_model), name)
    if hasattr(param, "_hp_mapping") or hasattr(param, "ds_id"):
        from deepspeed.utils import safe_get_full_fp32_param

        master = safe_get_full_fp32_param(param)
        if master is not None:
            return float(master)
    return float(param.detach().float())
