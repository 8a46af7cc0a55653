"""What a training step runs on, built in one place for the trainer, ``tools/bench_step.py`` and the OpenCLIP race.

``init_process_group`` is the one process-group set-up (idempotent: a launcher or a test may have made the group),
``build_components`` the one engine assembly from a ``StepPlan`` (``alignclip.training.plan``: device, batch layout,
fast path and DeepSpeed config, resolved there once): the model with the fast path's switches, AdamW over its
parameter groups, the DeepSpeed engine (compiled when the fast path says so) and the objective.
"""

from __future__ import annotations

import datetime
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from alignclip.config import Config
from alignclip.distributed.env import DistEnv
from alignclip.distributed.layout import BatchLayout
from alignclip.training.deepspeed_config import resolve_device
from alignclip.training.fast_path import FastPath, compile_engine, images_to_device, prepare_model, tokens_to_device

if TYPE_CHECKING:
    from alignclip.training.plan import StepPlan


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def init_process_group(config: Config, env: DistEnv) -> torch.device:
    """This rank's device, with the process group DeepSpeed needs (nccl on CUDA, gloo on CPU) made unless it
    exists. ``env`` comes from ``alignclip.distributed.env.setup_distributed_env`` (which exported the torchrun
    variables that ``init_distributed`` reads). Every collective of the group gives up after
    ``train.collective_timeout_s`` (a lost peer ends the run, exit 124, instead of hanging it)."""
    import deepspeed

    device_type = resolve_device(config.train.device)
    if device_type == "cuda":
        torch.cuda.set_device(env.local_rank)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device_type == "cuda" else "gloo",
                                   auto_mpi_discovery=False, verbose=False,
                                   timeout=datetime.timedelta(seconds=config.train.collective_timeout_s))
    return torch.device(device_type, env.local_rank) if device_type == "cuda" else torch.device("cpu")


@dataclass
class Components:
    """The engine (model + optimizer under DeepSpeed), the objective and how a host batch reaches the device."""

    config: Config
    env: DistEnv
    device: torch.device
    layout: BatchLayout
    fast: FastPath
    ds_config: dict
    engine: object  # deepspeed.DeepSpeedEngine
    objective: nn.Module
    input_dtype: torch.dtype

    @property
    def model(self) -> nn.Module:
        return self.engine.module

    def to_device(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (in the input dtype) and tokens on the device: asynchronous copies from pinned batches,
        channels-last images when the fast path says so."""
        from alignclip.data.device_decode import device_images  # data.decode=gpu: JPEGs decoded here

        return (images_to_device(device_images(batch, self.device), self.device, self.input_dtype, self.fast),
                tokens_to_device(batch["text"], self.device, self.fast))


def build_components(plan: "StepPlan", model: Optional[nn.Module] = None) -> Components:
    """The process group, then the model (``model`` if given, e.g. the race's, else built from ``config.model``
    with the same initial weights on every rank), AdamW, the DeepSpeed engine, the objective, all as ``plan``
    says. Afterwards the random streams are per rank, for anything random in the step."""
    from alignclip.losses import build_objective
    from alignclip.models import build_model
    from alignclip.training.engine import initialize_engine
    from alignclip.training.optim import build_optimizer

    config, env, fast = plan.config, plan.env, plan.fast
    device = init_process_group(config, env)
    if model is None:
        seed_everything(config.train.seed)  # the same initial weights on every rank
        model = build_model(config.model)
        if config.model.init_from:  # before the engine exists: every rank loads the same weights
            from alignclip.interop import init_weights

            init_weights(model, config.model)
    model = prepare_model(model, fast)
    engine = compile_engine(initialize_engine(model, build_optimizer(model, config.optim, fast.adamw_impl),
                                              plan.ds_config), fast)
    seed_everything(config.train.seed + 1_000_003 * env.rank)
    objective = build_objective(config.loss).to(device)
    input_dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
    return Components(config=config, env=env, device=device, layout=plan.layout, fast=fast,
                      ds_config=plan.ds_config, engine=engine, objective=objective, input_dtype=input_dtype)
