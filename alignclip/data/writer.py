"""Writing shards as img2dataset does (``KEY.jpg``, ``KEY.txt``, ``KEY.json`` [+ ``KEY.sem.npy``] in a tar, and a
``NNNNN_stats.json`` next to it), atomically: a shard appears under its final name only once it is complete, so an
interrupted writer leaves no half shard behind and a rerun can resume by skipping the shards that exist."""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


class ShardWriter:
    """One tar shard. Use as a context manager; on an exception the partial file is removed.

    Members get fixed metadata (mtime 0, uid 0, mode 0644), so the same samples give byte-identical shards.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self.count = 0

    def write(self, key: str, fields: dict[str, bytes | str | dict | np.ndarray]) -> None:
        """Add one sample: ``fields`` maps an extension (``jpg``, ``txt``, ``json``, ``sem.npy``) to its content."""
        for ext, value in fields.items():
            if isinstance(value, str):
                value = value.encode("utf-8")
            elif isinstance(value, dict):
                value = json.dumps(value, sort_keys=True).encode("utf-8")
            elif isinstance(value, np.ndarray):
                value = npy_bytes(value)
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(value), 0, 0o644
            self._tar.addfile(info, io.BytesIO(value))
        self.count += 1

    def close(self) -> None:
        self._tar.close()
        os.replace(self._tmp, self.path)
        write_stats(self.path, self.count)

    def abort(self) -> None:
        self._tar.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_stats(shard: str | Path, count: int, failed: int = 0) -> None:
    """img2dataset's per-shard ``NNNNN_stats.json`` (the fields the pipeline reads: ``successes``)."""
    shard = Path(shard)
    stats = {"count": count + failed, "successes": count, "failed_to_download": 0, "failed_to_resize": failed}
    atomic_write_bytes(shard.with_name(shard.stem + "_stats.json"), json.dumps(stats, indent=1).encode())


def shard_name(index: int, prefix: str = "") -> str:
    return f"{prefix}{index:05d}.tar"


def sample_key(shard_index: int, index_in_shard: int, samples_per_shard: int) -> str:
    """img2dataset's key: the sample's global index, zero-padded (9 digits as it does)."""
    return f"{shard_index * samples_per_shard + index_in_shard:09d}"


# ---------------------------------------------------------------------------------- captions files (tools)
_IMAGE_COLUMNS = ("image", "filepath", "file", "path", "filename", "image_path", "img")
_CAPTION_COLUMNS = ("caption", "text", "txt", "title", "alt")


def _pick(columns: Iterable[str], choices: tuple[str, ...], what: str, source: str) -> str:
    lowered = {c.lower().strip(): c for c in columns}
    for choice in choices:
        if choice in lowered:
            return lowered[choice]
    raise ValueError(f"{source}: no {what} column; expected one of {list(choices)}, found {list(lowered)}")


def read_captions_file(path: str | Path) -> list[tuple[str, str]]:
    """(image path, caption) pairs from a CSV, TSV (with a header row) or JSONL file; image paths as written."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not rows:
            return []
        image_col = _pick(rows[0].keys(), _IMAGE_COLUMNS, "image", str(path))
        caption_col = _pick(rows[0].keys(), _CAPTION_COLUMNS, "caption", str(path))
        return [(str(r[image_col]), str(r.get(caption_col) or "")) for r in rows]
    delimiter = "\t" if suffix in (".tsv", ".tab") else ","
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        image_col = _pick(reader.fieldnames or [], _IMAGE_COLUMNS, "image", str(path))
        caption_col = _pick(reader.fieldnames or [], _CAPTION_COLUMNS, "caption", str(path))
        return [(row[image_col], row[caption_col] or "") for row in reader]


def chunk_pairs(pairs: list, num_shards: int, samples_per_shard: int) -> Iterator[tuple[int, list]]:
    for shard in range(num_shards):
        chunk = pairs[shard * samples_per_shard:(shard + 1) * samples_per_shard]
        if chunk:
            yield shard, chunk
