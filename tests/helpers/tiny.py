"""A toy-sized training run: the one ``tiny_overrides``, toy colour-shape shards, TensorBoard read-back."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220), "yellow": (230, 220, 40)}
SHAPES = ("square", "disc", "bar")


def tiny_overrides(data: Mapping[str, str] | Path | str, run_dir: Path | str | None = None, *,
                   alignclip: bool = False, **extra) -> list[str]:
    """``key=value`` overrides for a run that takes seconds per step on CPU (32 px images, width 32, one block per
    tower, DeepSpeed in fp32, batch 16).

    ``data``: ``{"train": folder, "val": folder}`` of shards (``write_toy_shards``), or a folder in which the
    generated dataset is rendered at toy size (2 shards of 32 samples, 32 validation samples, 32 px).
    ``alignclip``: SharedCLIP + CRSep + IMSep (image side) with the offline MiniLM, instead of CLIP.
    ``extra`` (dotted keys, given as ``**{"train.max_steps": 3}``) overrides any of these.
    """
    values = {
        "data.workers": 0, "data.shuffle_buffer": 16,
        "model.arch": "clip", "model.embed_dim": 32,
        "model.vision.image_size": 32, "model.vision.patch_size": 8, "model.vision.width": 32,
        "model.vision.layers": 1, "model.vision.heads": 2,
        "model.text.context_length": 16, "model.text.width": 32, "model.text.layers": 1, "model.text.heads": 2,
        "loss.impl": "dense", "train.global_batch_size": 16, "train.epochs": 4, "optim.lr": 2e-3,
        "optim.warmup_steps": 3, "fast_path.precision": "fp32", "train.device": "cpu",
        "checkpoint.every_steps": 1000, "logging.log_every_steps": 1, "logging.gap_every_steps": 1000,
        "logging.gap_batch_size": 32, "logging.progress_bar": False,
    }
    if isinstance(data, Mapping):
        values.update({"data.train": data["train"], "data.val": data["val"]})
    else:
        values.update({"data.train": "generated", "data.val": "generated", "data.cache_dir": str(data),
                       "data.generated.num_shards": 2, "data.generated.samples_per_shard": 32,
                       "data.generated.image_size": 32, "data.generated.val_samples": 32,
                       "data.generated.seed": 0})
    if alignclip:
        values.update({"model.arch": "sharedclip", "loss.clip_weight": 0.0, "loss.crsep_weight": 1.0,
                       "loss.imsep_weight": 0.5, "loss.imsep_sides": "image", "loss.semantic_model": "minilm-offline"})
    if run_dir is not None:
        values["run_dir"] = str(run_dir)
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def export_untrained(out_path: Path, overrides: list[str], seed: int = 0) -> Path:
    """An exported model (alignclip.export) with seeded random weights of the config ``overrides`` give: for
    encoding tests that need a real model, not a trained one."""
    import torch

    from alignclip.config import load_config
    from alignclip.export import save_exported
    from alignclip.models import build_model

    config = load_config(None, overrides)
    torch.manual_seed(seed)
    return save_exported(build_model(config.model), config, out_path)


def draw_shape(colour: str, shape: str, rng: np.random.Generator, size: int = 40) -> bytes:
    from PIL import Image

    pixels = np.full((size, size, 3), 245, np.uint8) + rng.integers(0, 10, (size, size, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.integers(14, size - 14, 2)
    mask = {"square": (abs(yy - cy) < 9) & (abs(xx - cx) < 9),
            "disc": (yy - cy) ** 2 + (xx - cx) ** 2 < 100,
            "bar": (abs(yy - cy) < 4) & (abs(xx - cx) < 13)}[shape]
    pixels[mask] = COLOURS[colour]
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


def write_toy_shards(folder: Path, num_shards: int = 4, per_shard: int = 32, seed: int = 0,
                     corrupt_every: int = 0) -> str:
    """Caption = colour + shape: a task that a tiny model learns in a few dozen steps. With ``corrupt_every`` = k,
    every k-th sample's image is bytes no decoder reads."""
    from alignclip.data.writer import ShardWriter, sample_key, shard_name

    rng = np.random.default_rng(seed)
    for s in range(num_shards):
        with ShardWriter(folder / shard_name(s)) as writer:
            for i in range(per_shard):
                colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
                image = draw_shape(colour, shape, rng)
                if corrupt_every and i % corrupt_every == corrupt_every - 1:
                    image = b"\xff\xd8 not a jpeg"
                writer.write(sample_key(s, i, per_shard), {"jpg": image,
                                                           "txt": f"a {colour} {shape}", "json": {}})
    return str(folder) + "/"


def scalar_events(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every TensorBoard scalar of a run as ``tag -> [(step, value)]`` (histogram tags with value 0.0)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(run_dir) / "tb"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    out = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in tags["scalars"]}
    out.update({tag: [(e.step, 0.0) for e in acc.Histograms(tag)] for tag in tags["histograms"]})
    return out


def perturbed_model(config_name: str, overrides: Sequence[str] = ()):
    """(model, config) built from a shipped config (``model/clip_tiny``, ``experiment/embedded_default`` ...), every
    weight moved off its initial value (often zero or one): a trained model's stand-in where the architecture and
    the weight maps are what a test checks."""
    import torch

    from alignclip.config import load_config
    from alignclip.models import build_model

    config = load_config(config_name, list(overrides))
    torch.manual_seed(0)
    model = build_model(config.model).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, config


def zero0_checkpoint(root: Path, model, config) -> Path:
    """A ZeRO-0 checkpoint of ``model`` as the engine lays it out (``root/config.yaml``,
    ``root/checkpoints/step_00000001/`` with its model states, trainer state and manifest): what export reads."""
    import json
    from dataclasses import asdict

    import torch

    from alignclip import checkpoints
    from alignclip.config import save_config

    step = root / "checkpoints" / "step_00000001"
    step.mkdir(parents=True)
    torch.save({"module": model.state_dict()}, step / "mp_rank_00_model_states.pt")
    (step / checkpoints.STATE_FILE).write_text(json.dumps(asdict(checkpoints.TrainerState(step=1))))
    checkpoints.write_manifest(step)  # tools verify what they read, as resume does
    save_config(config, root)
    return step
