"""``deepspeed.initialize`` for our models, with the one work-around they need on DeepSpeed 0.19."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def _zero_dim_params_as_1d():
    """DeepSpeed 0.19's engine set-up broadcasts each parameter from rank 0 as ``p.data.view(torch.uint8)``, which
    fails for a 0-dim tensor (the logit scale): "self.dim() cannot be 0 to view Float as Byte". During that
    broadcast only, 0-dim parameters are viewed as [1]; they get their shape back before the optimizer and its
    gradient hooks are built, so the module, its gradients and its checkpoints keep the scalar."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    original = DeepSpeedEngine._broadcast_model

    def broadcast_with_scalars_as_1d(engine) -> None:
        scalars = [p for p in engine.module.parameters() if p.dim() == 0]
        for p in scalars:
            p.data = p.data.reshape(1)
        try:
            original(engine)
        finally:
            for p in scalars:
                p.data = p.data.reshape(())

    DeepSpeedEngine._broadcast_model = broadcast_with_scalars_as_1d
    try:
        yield
    finally:
        DeepSpeedEngine._broadcast_model = original


def initialize_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict):
    """The DeepSpeed engine over ``model`` and ``optimizer`` with the generated config (deepspeed_config.py)."""
    import deepspeed

    with _zero_dim_params_as_1d():
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine
