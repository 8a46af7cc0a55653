"""Export a training checkpoint to one safetensors file, and load it back without DeepSpeed.

    export_checkpoint(run_dir | checkpoints dir | step dir, "model.safetensors")
    model, tokenizer, transform = alignclip.load("model.safetensors")

The file holds the fp32 weights and, as safetensors metadata, the run's resolved config (YAML); a sidecar
``<file>.yaml`` repeats the config for people. ZeRO checkpoints are consolidated with DeepSpeed's own
``zero_to_fp32`` (the fp32 master weights, whatever the training precision); a ZeRO-0 checkpoint's module states
are read directly. Exporting reads the training checkpoint, which torch pickles: export only checkpoints you
wrote. Loading an exported file never unpickles anything.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from alignclip.config import Config, from_yaml_text, to_yaml

log = logging.getLogger(__name__)

FORMAT_VERSION = "1"
META_CONFIG, META_FORMAT, META_SOURCE = "alignclip_config", "alignclip_format", "alignclip_source"
MODEL_STATES_FILE = "mp_rank_00_model_states.pt"


def resolve_checkpoint(path: str | Path) -> Path:
    """A step directory from a run directory (its ``latest``), a checkpoints directory, or the step dir itself."""
    from alignclip.training.checkpoint import CHECKPOINT_SUBDIR, find_latest

    p = Path(path)
    if (p / MODEL_STATES_FILE).is_file():
        return p
    run_dir = p.parent if p.name == CHECKPOINT_SUBDIR else p
    found = find_latest(run_dir)
    if found is None:
        raise FileNotFoundError(f"no complete checkpoint under {path}: expected a run directory with "
                                f"{CHECKPOINT_SUBDIR}/latest, or a step_XXXXXXXX directory holding {MODEL_STATES_FILE}")
    return found


def run_config_of(step_dir: Path) -> Config:
    """The run's resolved config: <run_dir>/config.yaml, two levels above the step directory."""
    config_file = step_dir.parent.parent / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: the trainer writes the resolved config into the run "
                                f"directory; pass config= to export_checkpoint for a checkpoint moved elsewhere")
    return from_yaml_text(config_file.read_text())


def consolidated_state_dict(step_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 module weights of a DeepSpeed checkpoint directory (single file, no ZeRO partitions left)."""
    has_zero_partitions = any(step_dir.glob("*zero_pp_rank_*optim_states.pt"))
    if has_zero_partitions:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)
    else:  # ZeRO stage 0: the engine saved the whole module
        saved = torch.load(step_dir / MODEL_STATES_FILE, map_location="cpu", weights_only=False)
        state = saved["module"]
    return {k.removeprefix("module."): v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
            for k, v in state.items()}


def export_checkpoint(checkpoint: str | Path, out_path: str | Path, config: Config | None = None) -> Path:
    """Write ``out_path`` (safetensors, config in its metadata) and ``out_path`` + ``.yaml``; return out_path."""
    from alignclip.models import build_model

    step_dir = resolve_checkpoint(checkpoint)
    config = config or run_config_of(step_dir)
    model = build_model(config.model)
    missing, unexpected = model.load_state_dict(consolidated_state_dict(step_dir), strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {step_dir} does not match model config {config.model.arch}: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return save_exported(model, config, out_path, source=str(step_dir))


def save_exported(model: nn.Module, config: Config, out_path: str | Path, source: str = "") -> Path:
    """Write a model and its config as an export (safetensors + metadata, YAML sidecar)."""
    from safetensors.torch import save_model

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    yaml_text = to_yaml(config)
    save_model(model, str(out), metadata={META_CONFIG: yaml_text, META_FORMAT: FORMAT_VERSION, META_SOURCE: source})
    Path(str(out) + ".yaml").write_text(yaml_text)
    log.info("exported %s -> %s", source or "model", out)
    return out


def read_config(path: str | Path) -> Config:
    """The config stored in an exported file's metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if META_CONFIG not in meta:
        raise ValueError(f"{path} has no {META_CONFIG!r} metadata: not a file written by alignclip.export")
    return from_yaml_text(meta[META_CONFIG])


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Config]:
    """The model of an exported file, in eval mode, and its config. Safetensors only: nothing is unpickled."""
    from safetensors.torch import load_model as load_weights

    from alignclip.models import build_model

    config = read_config(path)
    model = build_model(config.model)
    load_weights(model, str(path), strict=True, device=str(device))
    return model.to(device).eval(), config


class ImageTransform:
    """PIL image(s) -> float [3, H, W] (or [b, 3, H, W] for a list): the evaluation transform of the data
    pipeline (centre crop, bicubic resize, CLIP mean/std)."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def __call__(self, images):
        from alignclip.data.transforms import eval_transform, normalize_batch

        many = isinstance(images, (list, tuple))
        arrays = [np.asarray(eval_transform(img.convert("RGB"), self.image_size))
                  for img in (images if many else [images])]
        batch = normalize_batch(arrays)
        return batch if many else batch[0]


def load(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Callable, ImageTransform]:
    """(model, tokenizer, image transform) of an exported file; no DeepSpeed needed."""
    from alignclip.tokenizer import get_tokenizer

    model, config = load_model(path, device)
    return model, get_tokenizer(config.model.text.context_length), ImageTransform(config.model.vision.image_size)

