"""How the global batch is split over ranks and accumulation steps: written once, for the DeepSpeed config, the
data loader and the run plan.

``train.global_batch_size`` = micro-batch (per device, per forward) x gradient accumulation x world size.
``train.micro_batch_size`` 0 means no accumulation (micro = global / world).
"""

from __future__ import annotations

from dataclasses import dataclass

from alignclip.config import ConfigError


@dataclass(frozen=True)
class BatchLayout:
    global_batch: int
    micro_batch: int  # per device, per forward (the loader's per-rank batch)
    accumulation: int
    world_size: int


def batch_layout(train, world_size: int) -> BatchLayout:
    """Split ``train.global_batch_size`` (``train``: the config's train section, or a whole Config) over ranks and
    accumulation steps; errors name the keys to change."""
    train = getattr(train, "train", train)
    global_batch, micro = train.global_batch_size, train.micro_batch_size
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
