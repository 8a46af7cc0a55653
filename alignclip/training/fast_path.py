"""The fast path's switches, resolved per device, and where each one acts on the model, the engine and a batch.

Every switch is a config key (``fast_path.*``, ``optim.adamw_impl``, ``data.pin_memory``, ``data.prefetch_factor``, ``model.grad_checkpointing``)
whose ``null`` / ``auto`` value is resolved here, once, so the trainer and ``tools/bench_step.py`` run the same path.
docs/performance.md records what each does to a CPU step (measured) and to an H100 step (argued).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from alignclip.config import Config
from alignclip.data.transforms import normalize_on_device


@dataclass(frozen=True)
class FastPath:
    device_type: str  # cuda | cpu
    precision: str  # bf16 | fp32
    compile: bool
    compile_mode: str
    adamw_impl: str  # fused | foreach | loop
    sdpa: bool
    channels_last: bool  # the images (see prepare_model)
    pin_memory: bool
    grad_checkpointing: bool

    @property
    def non_blocking(self) -> bool:
        """Asynchronous host-to-device copies need a pinned source; to a CPU device there is no copy at all."""
        return self.device_type == "cuda" and self.pin_memory

    def describe(self) -> str:
        return (f"precision={self.precision} compile={self.compile} adamw={self.adamw_impl} sdpa={self.sdpa} "
                f"channels_last={self.channels_last} pin_memory={self.pin_memory} "
                f"grad_checkpointing={self.grad_checkpointing}")


def _auto(value, on_cuda: bool, device_type: str) -> bool:
    return bool(value) if value is not None else (on_cuda and device_type == "cuda")


def resolve_fast_path(config: Config, device_type: str) -> FastPath:
    """Each ``null`` / ``auto`` switch to what pays on ``device_type`` (measured on CPU, argued for CUDA)."""
    from alignclip.training.deepspeed_config import resolve_precision

    fp = config.fast_path
    # fused pays on both: one pass over ZeRO's flat fp32 partition instead of ~10 (measured on CPU, -25 % step at
    # the tiny model, docs/performance.md); under ZeRO-1/2 foreach and loop see the same one flat tensor per group
    adamw = "fused" if config.optim.adamw_impl == "auto" else config.optim.adamw_impl
    return FastPath(device_type=device_type, precision=resolve_precision(fp.precision, device_type),
                    compile=_auto(fp.compile, True, device_type), compile_mode=fp.compile_mode,
                    adamw_impl=adamw, sdpa=fp.sdpa,
                    channels_last=_auto(fp.channels_last, True, device_type),
                    pin_memory=_auto(config.data.pin_memory, True, device_type),
                    grad_checkpointing=config.model.grad_checkpointing)


def adamw_kwargs(adamw_impl: str) -> dict:
    """torch.optim.AdamW's implementation flags: one fused kernel, multi-tensor (foreach) or a per-tensor loop."""
    return {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}[adamw_impl]


def prepare_model(model: nn.Module, fast: FastPath) -> nn.Module:
    """Set the attention path of every timm Attention (before the engine is built).

    Channels-last acts on the images only, not on the patch conv's weight: DeepSpeed views every parameter as
    contiguous bytes (its broadcast, ZeRO's flat buffers), which an NHWC weight is not. A conv with an NHWC input
    runs NHWC (cuDNN converts the 0.6 M-element weight per call, nothing next to the step)."""
    for module in model.modules():
        if hasattr(module, "fused_attn"):  # timm's Attention reads this flag at every forward
            module.fused_attn = fast.sdpa
    return model


def compile_engine(engine, fast: FastPath, backend: str | None = None):
    """torch.compile of the module through DeepSpeed (``engine.compile`` compiles the module in place, so the
    state-dict keys, hence checkpoints and exports, keep their names: no ``_orig_mod.`` prefix). ``backend``:
    the accelerator's default (inductor) unless given (tests use "eager")."""
    if fast.compile:
        kwargs = {"compile_kwargs": {"mode": fast.compile_mode} if fast.compile_mode != "default" else {}}
        engine.compile(**kwargs, **({"backend": backend} if backend else {}))
    return engine


def images_to_device(images: torch.Tensor, device: torch.device, dtype: torch.dtype, fast: FastPath) -> torch.Tensor:
    """Host batch -> device: asynchronous from pinned memory, cast on the device, NHWC when channels-last."""
    images = normalize_on_device(images.to(device, non_blocking=fast.non_blocking), dtype)  # uint8 batches
    if fast.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images


def tokens_to_device(tokens: torch.Tensor, device: torch.device, fast: FastPath) -> torch.Tensor:
    return tokens.to(device, non_blocking=fast.non_blocking)
