"""The DeepSpeed config, derived from the project config (never a hand-kept JSON that can disagree with it).

Batch sizes: micro-batch (per device) x gradient accumulation x world size = global batch. ``train.micro_batch_size``
0 means no accumulation (micro = global / world). Precision (``fast_path.precision``): ``auto`` is bf16 on CUDA and fp32 on CPU (DeepSpeed
refuses fp16 on CPU; bf16 works there but is slow). The optimizer and the lr are ours (``optim``, ``schedule``),
so the dict has no "optimizer" or "scheduler" section.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from alignclip.config import Config, ConfigError
from alignclip.fs import atomic_write


@dataclass(frozen=True)
class BatchLayout:
    global_batch: int
    micro_batch: int  # per device, per forward
    accumulation: int
    world_size: int


def resolve_device(train_device: str) -> str:
    if train_device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if train_device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("key 'train.device' is 'cuda' but no CUDA device is visible; use train.device=cpu")
    return train_device


def resolve_precision(precision: str, device: str) -> str:
    if precision == "auto":
        return "bf16" if device == "cuda" else "fp32"
    return precision


def batch_layout(config: Config, world_size: int) -> BatchLayout:
    """Split ``train.global_batch_size`` over ranks and accumulation steps; errors name the keys to change."""
    global_batch, micro = config.train.global_batch_size, config.train.micro_batch_size
    if micro == 0:
        if global_batch % world_size:
            raise ConfigError(
                f"key 'train.global_batch_size' ({global_batch}) is not divisible by the world size ({world_size}); "
                f"choose a multiple of {world_size}, or set 'train.micro_batch_size' so that micro x accumulation "
                f"x world = global")
        micro = global_batch // world_size
    if global_batch % (micro * world_size):
        raise ConfigError(
            f"key 'train.global_batch_size' ({global_batch}) must equal 'train.micro_batch_size' ({micro}) x "
            f"gradient accumulation x world size ({world_size}); {global_batch} is not a multiple of "
            f"{micro * world_size}")
    return BatchLayout(global_batch, micro, global_batch // (micro * world_size), world_size)


def build_deepspeed_config(config: Config, world_size: int, device: str = "cpu") -> dict:
    layout = batch_layout(config, world_size)
    precision = resolve_precision(config.fast_path.precision, device)
    ds = config.deepspeed
    zero = {"stage": ds.zero_stage, "contiguous_gradients": True,
            "allgather_bucket_size": ds.allgather_bucket_size, "reduce_bucket_size": ds.reduce_bucket_size,
            # overlapping needs CUDA streams; on CPU it only adds copies
            "overlap_comm": ds.overlap_comm and device == "cuda"}
    return {
        "train_batch_size": layout.global_batch,
        "train_micro_batch_size_per_gpu": layout.micro_batch,
        "gradient_accumulation_steps": layout.accumulation,
        "gradient_clipping": config.optim.grad_clip,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        "checkpoint": {"load_universal": ds.universal_checkpoint},
        "steps_per_print": 2**31 - 1,  # our monitor logs; DeepSpeed's own prints would interleave with the bar
        "wall_clock_breakdown": False,
    }


def write_deepspeed_config(ds_config: dict, run_dir: str | Path) -> Path:
    """Write the dict that ``deepspeed.initialize`` receives into the run directory (atomically)."""
    text = json.dumps(ds_config, indent=2, sort_keys=True) + "\n"
    return atomic_write(Path(run_dir) / "deepspeed_config.json", text)
