"""Data a run needs before it trains: the generated shards, and the caption embeddings an IMSep loss rescales by.

Done once, in the submitting process, so the runs (several seeds, several variants) share one copy and the
training step never runs the sentence encoder (the precomputed path of docs/data.md).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from alignclip.config import Config


def prepare_data(config: Config) -> Config:
    """Render the generated shards if needed; precompute the semantic sidecars the objective needs. Returns the
    config with ``data.semantic_dir`` set when it made them (other data: the config unchanged)."""
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
    from alignclip.data.sidecars import sidecar_path
    from alignclip.semantic import SemanticEncoder, embed_shards

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
