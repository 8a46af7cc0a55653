"""Caption-embedding sidecars: one ``<semantic_dir>/<shard stem>.sem.npz`` per shard (arrays ``keys`` and
``embeddings``, fp16 rows) that the pipeline joins to its samples by key. ``alignclip.semantic`` writes them; the
data pipeline only reads them, so it needs no sentence encoder."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np

from alignclip.fs import atomic_write

STORAGE_DTYPE = np.float16  # half the disk and IO of fp32; the rescaling only needs ~3 significant digits


def sidecar_path(semantic_dir: str | Path, shard: str) -> Path:
    return Path(semantic_dir) / (Path(shard).stem + ".sem.npz")


def read_sidecar(semantic_dir: str | Path, shard: str) -> dict[str, np.ndarray]:
    """{key: fp16 row} of one shard's sidecar."""
    with np.load(sidecar_path(semantic_dir, shard), allow_pickle=False) as npz:
        keys, rows = npz["keys"], npz["embeddings"]
    return {str(k): rows[i] for i, k in enumerate(keys)}


def write_sidecar(semantic_dir: str | Path, shard: str, keys: Sequence[str], embeddings: np.ndarray) -> Path:
    path = sidecar_path(semantic_dir, shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, keys=np.asarray(list(keys), dtype=str), embeddings=embeddings.astype(STORAGE_DTYPE))
    atomic_write(path, buf.getvalue())
    return path
