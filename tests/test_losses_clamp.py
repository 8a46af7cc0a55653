"""The logit-scale clamp under the DeepSpeed engine on CPU (ZeRO 1, bf16, two ranks): the scale used in the forward
never exceeds 100, and with ``clamp_logit_scale_`` after each step the stored fp32 master value stays at most
ln 100, whereas an in-place clamp of the module's parameter alone is overwritten from the master copy."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.helpers.ranks import run_on_ranks

MAX = math.log(100.0)
STEPS = 8


class TinyContrastive(nn.Module):
    """Two linear towers and a logit scale clamped in forward, exactly as the real model does it."""

    def __init__(self):
        super().__init__()
        self.image = nn.Linear(8, 4)
        self.text = nn.Linear(8, 4)
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / 0.07)))

    def forward(self, images, tokens):
        return {"image_embeds": F.normalize(self.image(images), dim=-1),
                "text_embeds": F.normalize(self.text(tokens), dim=-1),
                "log_logit_scale": self.logit_scale.clamp(max=MAX)}


def _inputs(model_kind):
    g = torch.Generator().manual_seed(0)
    if model_kind == "tiny":
        return torch.randn(2, 8, generator=g, dtype=torch.bfloat16), torch.randn(2, 8, generator=g,
                                                                                 dtype=torch.bfloat16)
    tokens = torch.tensor([[49406, 320, 49407] + [0] * 29, [49406, 1125, 539, 49407] + [0] * 28])
    return torch.randn(2, 3, 64, 64, generator=g, dtype=torch.bfloat16), tokens


def push_the_scale_up(rank, world, model_kind, clamp_mode):
    """Train with a loss that rewards a larger scale (Adam, lr 0.5); record the effective and stored values."""
    import deepspeed

    from alignclip.config import load_config
    from alignclip.losses import build_objective
    from alignclip.losses.temperature import clamp_logit_scale_, stored_logit_scale
    from alignclip.models import build_model
    from alignclip.training.optim import build_optimizer

    config = load_config("model/clip_tiny", ["optim.lr=0.5"])
    torch.manual_seed(0)
    model = build_model(config.model) if model_kind == "real" else TinyContrastive()
    ds_config = {"train_batch_size": 2 * world, "train_micro_batch_size_per_gpu": 2,
                 "gradient_accumulation_steps": 1, "bf16": {"enabled": True}, "zero_optimization": {"stage": 1},
                 "steps_per_print": 2**31 - 1}
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, config.optim), config=ds_config)
    objective = build_objective(config.loss)
    images, tokens = _inputs(model_kind)
    effective, stored, module_values, module_after_step = [], [], [], []
    for _ in range(STEPS):
        out = engine(images, tokens)
        effective.append(out["log_logit_scale"].float().exp().max().item())
        loss = objective(out["image_embeds"], out["text_embeds"], out["log_logit_scale"]).total
        loss = loss - 10.0 * out["log_logit_scale"].float().sum()  # a strong push towards a larger scale
        engine.backward(loss)
        engine.step()
        module_after_step.append(engine.module.logit_scale.float().max().item())
        if clamp_mode == "helper":
            clamp_logit_scale_(engine, MAX)
        elif clamp_mode == "module_only":  # OpenCLIP's in-place clamp, which ZeRO's master copy overwrites
            with torch.no_grad():
                engine.module.logit_scale.clamp_(max=MAX)
        stored.append(stored_logit_scale(engine))
        module_values.append(engine.module.logit_scale.float().max().item())
    return dict(effective=effective, stored=stored, module=module_values, module_after_step=module_after_step,
                dtype=str(engine.module.logit_scale.dtype))


def check_helper_run(results):
    for rank_result in results:
        assert rank_result["dtype"] == "torch.bfloat16"
        assert max(rank_result["effective"]) <= 100.0 + 1e-6
        assert rank_result["effective"][-1] > 95.0  # the push really reached the clamp
        assert all(v <= MAX + 1e-6 for v in rank_result["stored"])  # the fp32 master copy
        assert all(v <= MAX + 1e-6 for v in rank_result["module"])  # the bf16 module copy
        assert rank_result["stored"][-1] == pytest.approx(MAX, abs=1e-6)


@pytest.mark.heavy
@pytest.mark.timeout(300)
def test_forward_clamp_and_master_clamp_hold_under_zero1_bf16():
    check_helper_run(run_on_ranks(push_the_scale_up, 2, "tiny", "helper"))


@pytest.mark.heavy
@pytest.mark.timeout(300)
def test_in_place_module_clamp_alone_is_overwritten_by_the_master_copy():
    for rank_result in run_on_ranks(push_the_scale_up, 2, "tiny", "module_only"):
        assert max(rank_result["effective"]) <= 100.0 + 1e-6  # the forward clamp still bounds what is used
        assert rank_result["stored"][-1] > MAX + 0.5  # but the fp32 master weight kept growing
        # and each step copied it back over the module's clamped bf16 value: the in-place clamp never sticks
        assert rank_result["module_after_step"][-1] > MAX + 0.5


@pytest.mark.heavy
@pytest.mark.timeout(300)
def test_clamp_holds_for_the_real_model_under_zero1_bf16():
    check_helper_run(run_on_ranks(push_the_scale_up, 2, "real", "helper"))
