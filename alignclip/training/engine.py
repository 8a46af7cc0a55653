"""``deepspeed.initialize`` for our models from the generated DeepSpeed config, in one place for the trainer,
the tests and the tools."""

from __future__ import annotations

import torch


def initialize_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict):
    """The DeepSpeed engine over ``model`` and ``optimizer`` with the generated config (deepspeed_config.py)."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine
