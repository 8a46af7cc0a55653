"""Shard lists: spec parsing, per-epoch shuffling, the (rank, worker) split, sample counts and raw tar reading.

A spec (``data.train`` / ``data.val``) is one or more sources joined with ``'::'``; each source is a brace pattern
(``cc12m/{00000..01242}.tar``, ``{a,b}.tar``), a glob, a single tar, or a folder (every ``*.tar`` in it, sorted).

Nothing here decodes an image: this module deals in raw samples, ``dict(__key__, __shard__, ext -> bytes)``, as
webdataset names them (the key is a member's name up to its first '.', the extension the rest: ``0001.sem.npy``
-> key ``0001``, extension ``sem.npy``).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

log = logging.getLogger(__name__)

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


# ------------------------------------------------------------------------------------------- spec parsing
def expand_braces(pattern: str) -> list[str]:
    """``a/{000..002}.tar`` -> a/000.tar a/001.tar a/002.tar (zero padding kept); ``{x,y}`` -> both; nested ok."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[:match.start()], match.group(1), pattern[match.end():]
    numeric = _RANGE.match(body)
    if numeric:
        lo, hi = numeric.group(1), numeric.group(2)
        width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0
        step = 1 if int(hi) >= int(lo) else -1
        choices = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    else:
        choices = body.split(",")
    return [expanded for choice in choices for expanded in expand_braces(head + choice + tail)]


def brace_pattern_of(values: Sequence[str]) -> str | None:
    """The brace pattern whose expansion gives ``values``, when they look like one: the same head and tail around
    consecutive integers of one width (``a/00000.tar a/00001.tar`` -> ``a/{00000..00001}.tar``) or around a list
    of words (``a/x.tar a/y.tar`` -> ``a/{x,y}.tar``). None otherwise. Used to explain a shell-expanded override."""
    if len(values) < 2 or len(set(values)) < len(values):
        return None
    head = os.path.commonprefix(list(values))
    tail = os.path.commonprefix([v[len(head):][::-1] for v in values])[::-1]
    if any(c.isdigit() for c in head[-1:]):  # keep a range's leading digits inside the braces (00012 -> 0001|2)
        head = head.rstrip("0123456789")
    if any(c.isdigit() for c in tail[:1]):
        tail = tail.lstrip("0123456789")
    middles = [v[len(head):len(v) - len(tail)] for v in values]
    if not (head or tail) or not all(middles):
        return None
    padded = any(len(m) > 1 and m.startswith("0") for m in middles)
    if all(m.isdigit() for m in middles) and (not padded or len({len(m) for m in middles}) == 1):
        numbers = [int(m) for m in middles]
        if numbers == list(range(numbers[0], numbers[0] + len(numbers))):
            return f"{head}{{{middles[0]}..{middles[-1]}}}{tail}"
    if all("," not in m and "/" not in m for m in middles):
        return f"{head}{{{','.join(middles)}}}{tail}"
    return None


def expand_spec(spec: str) -> list[str]:
    """Every shard a spec names, in spec order (sources in ``'::'`` order, each expanded and folders sorted).

    Raises ``FileNotFoundError`` naming the source when a local source matches nothing.
    """
    shards: list[str] = []
    for source in (s.strip() for s in spec.split("::")):
        if not source:
            continue
        if source.startswith("pipe:") or "://" in source:  # remote: a URL or a shell command, taken as is
            shards.extend(expand_braces(source))
            continue
        found: list[str] = []
        for item in expand_braces(os.path.expanduser(source)):
            if os.path.isdir(item):
                found.extend(sorted(glob.glob(os.path.join(item, "*.tar"))))
            elif any(ch in item for ch in "*?["):
                found.extend(sorted(glob.glob(item)))
            else:
                found.append(item)
        if not found:
            raise FileNotFoundError(f"shard source '{source}' matches no *.tar file")
        missing = [p for p in found if not os.path.exists(p)]
        if missing:
            raise FileNotFoundError(f"shard source '{source}': {len(missing)} of {len(found)} shards do not exist, "
                                    f"e.g. {missing[:3]}")
        shards.extend(found)
    return shards


# --------------------------------------------------------------------------------------- epoch ordering
def epoch_shard_order(shards: Sequence[str], seed: int, epoch: int) -> list[str]:
    """The shard list permuted by a generator seeded with (seed, epoch): identical on every rank and worker."""
    rng = np.random.default_rng([seed, epoch, 0x5A4D])
    return [shards[i] for i in rng.permutation(len(shards))]


@dataclass(frozen=True)
class Slot:
    """One reader: a (rank, worker) pair; ``index`` runs over all ranks x workers."""

    rank: int
    worker: int
    num_workers: int
    world_size: int

    @property
    def index(self) -> int:
        return self.rank * self.num_workers + self.worker

    @property
    def count(self) -> int:
        return self.world_size * self.num_workers


def check_enough_shards(shards: Sequence[str], world_size: int, num_workers: int, spec_key: str = "data.train") -> None:
    """Plain lists give each reader whole shards, so there must be at least one shard per (rank, worker)."""
    readers = world_size * max(num_workers, 1)
    if len(shards) < readers:
        from alignclip.config import ConfigError

        raise ConfigError(
            f"key '{spec_key}' names {len(shards)} shard(s) but {world_size} rank(s) x {max(num_workers, 1)} "
            f"worker(s) (key 'data.workers') = {readers} readers each need at least one: lower 'data.workers', "
            f"set 'data.resampled=true', or write more, smaller shards (tools/make_shards.py)")


def slot_shards(shards: Sequence[str], slot: Slot, seed: int, epoch: int) -> list[str]:
    """This reader's share of a plain list for this epoch: every ``slot.count``-th shard of the epoch order."""
    return epoch_shard_order(shards, seed, epoch)[slot.index::slot.count]


# ------------------------------------------------------------------------------------------ sample counts
def _stats_count(shard: str) -> int | None:
    """img2dataset writes ``NNNNN_stats.json`` next to ``NNNNN.tar`` with the number of written samples."""
    stats = Path(shard).with_name(Path(shard).stem + "_stats.json")
    if stats.is_file():
        try:
            return int(json.loads(stats.read_text())["successes"])
        except (ValueError, KeyError, TypeError):
            return None
    return None


def _sizes_json(folder: Path) -> dict[str, int]:
    """webdataset's ``sizes.json`` convention: {shard file name: samples}."""
    path = folder / "sizes.json"
    if path.is_file():
        try:
            return {str(k): int(v) for k, v in json.loads(path.read_text()).items()}
        except (ValueError, AttributeError):
            log.warning("ignoring unreadable %s", path)
    return {}


def count_samples(shards: Sequence[str]) -> int:
    """Samples in the shards: from ``sizes.json`` or the img2dataset ``*_stats.json`` files, else by reading the
    tar headers (slow on a big list: prefer ``data.samples_per_epoch`` there)."""
    total = 0
    sizes_cache: dict[Path, dict[str, int]] = {}
    for shard in shards:
        folder = Path(shard).parent
        if folder not in sizes_cache:
            sizes_cache[folder] = _sizes_json(folder)
        n = sizes_cache[folder].get(Path(shard).name)
        if n is None:
            n = _stats_count(shard)
        if n is None:
            n = sum(1 for _ in iter_raw_samples(shard))
        total += n
    return total


# --------------------------------------------------------------------------------------------- tar reading
class ShardErrors:
    """Counts of what a reader skipped; plain ints so they travel with a batch from a worker process."""

    FIELDS = ("samples_read", "corrupt_image", "too_large_image", "missing_image", "empty_caption",
              "missing_semantic", "truncated_shard", "unreadable_shard", "wrapped_passes")

    def __init__(self) -> None:
        self.counts = {name: 0 for name in self.FIELDS}
        self._logged = 0

    def add(self, name: str, detail: str = "", n: int = 1) -> None:
        self.counts[name] += n
        if detail and name not in ("samples_read", "wrapped_passes") and self._logged < 20:
            self._logged += 1  # the counts keep growing; the log shows the first few of each reader
            log.warning("data: skipped (%s) %s", name, detail)


def _open_stream(shard: str):
    if shard.startswith("pipe:"):
        import subprocess

        proc = subprocess.Popen(shard[len("pipe:"):], shell=True, stdout=subprocess.PIPE)
        return proc.stdout
    return open(shard, "rb")


def split_member_name(name: str) -> tuple[str, str]:
    """``dir/0001.sem.npy`` -> (``dir/0001``, ``sem.npy``): the key ends at the basename's first '.'."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def iter_raw_samples(shard: str, errors: ShardErrors | None = None) -> Iterator[dict]:
    """Group consecutive tar members by key. A truncated or unreadable tar is counted and ends the shard early;
    the members read before the damage are kept (each was read completely)."""
    current: dict | None = None
    members = 0
    try:
        with _open_stream(shard) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_member_name(member.name)
                if not ext or key.startswith("__") or os.path.basename(key).startswith("."):
                    continue
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                members += 1
                if current is not None and current["__key__"] != key:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key, "__shard__": shard}
                current[ext] = data
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        # Nothing readable at all (not a tar, missing file) vs damage after some complete members.
        kind = "truncated_shard" if members else "unreadable_shard"
        if errors is not None:
            errors.add(kind, f"{shard} after {members} members: {err!r}")
        else:
            log.warning("data: %s %s after %d members: %r", kind, shard, members, err)
    if current is not None:
        yield current

