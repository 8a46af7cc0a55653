"""Caption-embedding sidecars: one ``<semantic_dir>/<shard stem>.sem.npz`` per shard (arrays ``keys`` and
``embeddings``, fp16 rows, plus the identity of the shard it was made from) that the pipeline joins to its samples
by key, refusing one made from another shard. ``alignclip.semantic`` writes them; the data pipeline only reads
them, so it needs no sentence encoder."""

from __future__ import annotations

import hashlib
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from alignclip.errors import ConfigError
from alignclip.fs import atomic_write

log = logging.getLogger(__name__)

STORAGE_DTYPE = np.float16  # half the disk and IO of fp32; the rescaling only needs ~3 significant digits


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
    path = sidecar_path(semantic_dir, shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    digests = np.frombuffer(b"".join(caption_digest(c) for c in captions), np.uint8).reshape(-1, DIGEST_BYTES)
    buf = io.BytesIO()
    np.savez(buf, keys=np.asarray(list(keys), dtype=str), embeddings=embeddings.astype(STORAGE_DTYPE),
             caption_digests=digests, shard_name=np.asarray(Path(shard).name), shard_size=np.asarray(shard_size(shard)),
             keys_sha256=np.asarray(keys_digest(keys)))
    atomic_write(path, buf.getvalue())
    return path
