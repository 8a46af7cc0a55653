"""The DeepSpeed config, derived from the project config (never a hand-kept JSON that can disagree with it).

Batch sizes: ``alignclip.distributed.layout`` (micro-batch x accumulation x world = global batch). Precision
(``fast_path.precision``): ``auto`` is bf16 on CUDA and fp32 on CPU (DeepSpeed refuses fp16 on CPU; bf16 works
there but is slow). The optimizer and the lr are ours (``optim``, ``schedule``),
so the dict has no "optimizer" or "scheduler" section.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from alignclip.config import Config, ConfigError
from alignclip.distributed.layout import BatchLayout, batch_layout
from alignclip.fs import atomic_write


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


def build_deepspeed_config(config: Config, world_size: int, device: str = "cpu",
                           layout: BatchLayout | None = None) -> dict:
    layout = layout or batch_layout(config, world_size)
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
