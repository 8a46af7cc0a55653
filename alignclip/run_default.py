"""The embedded default, end to end (what ``make run`` runs): a tiny AlignCLIP trained on the generated dataset.

    python -m alignclip.run_default                 # configs/experiment/embedded_default.yaml
    python -m alignclip.run_default --clip          # the same for CLIP (configs/experiment/embedded_clip.yaml)
    python -m alignclip.run_default key=value ...   # config overrides, as for alignclip.train

Steps: render the generated shards if absent (under ``$ALIGNCLIP_CACHE/generated``, default
``~/.cache/alignclip/generated``); when the loss rescales IMSep, encode every caption once with the offline MiniLM
into sidecar files next to the shards (precomputed caption embeddings, so the training step never runs SBERT); train (resuming if the run directory has a checkpoint); print
where the checkpoints and TensorBoard logs are and the final gap metrics on the held-out batch.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

from alignclip.config import CONFIG_DIR, Config, ConfigError, load_config

DEFAULT_CONFIG = CONFIG_DIR / "experiment" / "embedded_default.yaml"
CLIP_CONFIG = CONFIG_DIR / "experiment" / "embedded_clip.yaml"


def _defaults_for_a_laptop() -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the default run reaches for a hub
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from alignclip.paths import cache_dir

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(cache_dir("torch_extensions")))


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def prepare_data(config: Config) -> Config:
    """Render the generated shards if needed; precompute the semantic sidecars the objective needs."""
    from alignclip.data import generated
    from alignclip.data import shards as shardlib
    from alignclip.losses import build_objective

    if config.data.train != "generated":
        return config
    started = time.perf_counter()
    dataset = generated.ensure_generated(config.data)
    print(f"data: generated shards in {dataset.root} ({time.perf_counter() - started:.1f} s)", flush=True)
    if not build_objective(config.loss).needs_semantic or config.data.semantic_dir:
        return config
    from alignclip.semantic import SemanticEncoder, embed_shards, sidecar_path

    model_tag = Path(config.loss.semantic_model).name.replace("/", "_")
    semantic_dir = dataset.root / f"semantic-{model_tag}"
    shards = shardlib.expand_spec(dataset.spec("train")) + shardlib.expand_spec(dataset.spec("val"))
    started = time.perf_counter()
    if not all(sidecar_path(semantic_dir, s).is_file() for s in shards):
        encoder = SemanticEncoder(config.loss.semantic_model, "auto", batch_size=config.loss.semantic_batch_size)
        embed_shards(shards, encoder, semantic_dir)
        del encoder
    print(f"data: caption embeddings ({config.loss.semantic_model}) in {semantic_dir} "
          f"({time.perf_counter() - started:.1f} s)", flush=True)
    return replace(config, data=replace(config.data, semantic_dir=str(semantic_dir)))


def zero_shot(result, config: Config) -> dict[str, tuple[float, float]]:
    """Export the final checkpoint and classify the generated validation images zero-shot (colour, shape):
    task -> (top-1 accuracy, chance). The same path as tools/export.py + tools/evaluate.py."""
    if config.data.train != "generated" or result.checkpoint is None:
        return {}
    import numpy as np

    from alignclip.embeddings import encode_with_model
    from alignclip.eval.zeroshot import zero_shot_classification
    from alignclip.export import export_checkpoint

    exported = export_checkpoint(result.checkpoint, result.run_dir / "export" / "model.safetensors")
    embeddings = encode_with_model(exported, data="generated", split="val")
    out = {}
    for name, task in embeddings.zeroshot.items():
        labelled = task.labels >= 0
        metrics = zero_shot_classification(embeddings.image[labelled], task.labels[labelled], task.class_embeddings)
        out[name] = (metrics["acc1"], 1.0 / len(task.classnames))
    return out


def report(result, wall_s: float, config: Config, zero_shot_results: Optional[dict] = None) -> str:
    gap = result.gap
    chance = 1.0 / config.logging.gap_batch_size
    lines = [
        "",
        f"== {config.name}: {result.step} steps in {wall_s:.0f} s (exit code {result.exit_code})",
        f"run directory : {result.run_dir}",
        f"checkpoints   : {result.checkpoint}  (latest pointer: {result.run_dir / 'checkpoints' / 'latest'})",
        f"TensorBoard   : tensorboard --logdir {result.run_dir / 'tb'}",
        f"train log     : {result.run_dir / 'train.log'}",
    ]
    if not result.losses:
        lines.append(f"the run had already finished at step {result.step}: its figures are in train.log")
    else:
        first, last = result.losses[0][1], result.losses[-1][1]
        lines.append(f"loss          : {first:.3f} (step {result.losses[0][0]}) -> {last:.3f} (step {result.step})")
    if gap:
        lines += [
            f"alignment score (mean paired cosine, held-out {config.logging.gap_batch_size}): "
            f"{gap['gap/alignment_score']:.3f}",
            f"centroid distance (L2 between modality means): {gap['gap/centroid_distance']:.3f}",
            f"retrieval R@1 in the held-out batch: image->text {gap.get('gap/text_retrieval_recall@1', 0):.3f}, "
            f"text->image {gap.get('gap/image_retrieval_recall@1', 0):.3f} (chance {chance:.3f})",
        ]
    for name, (acc1, chance) in (zero_shot_results or {}).items():
        lines.append(f"zero-shot {name} (validation images, prompt ensembles): top-1 {acc1:.3f} (chance {chance:.3f})")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m alignclip.run_default", description=__doc__.splitlines()[0])
    parser.add_argument("--clip", action="store_true", help="run the embedded CLIP baseline instead")
    parser.add_argument("--config", default=None, help="another experiment file (default: embedded_default)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    _defaults_for_a_laptop()
    started = time.perf_counter()
    try:
        config = load_config(args.config or (CLIP_CONFIG if args.clip else DEFAULT_CONFIG), args.overrides)
        config = prepare_data(config)
        from alignclip.training.loop import train

        result = train(config)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if int(os.environ.get("RANK", "0")) == 0:
        zero_shot_results = zero_shot(result, config) if result.exit_code == 0 else {}
        print(report(result, time.perf_counter() - started, config, zero_shot_results), flush=True)
    raise SystemExit(result.exit_code)


if __name__ == "__main__":
    main()
