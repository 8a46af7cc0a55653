"""Shard lists: spec parsing, per-epoch shuffling, the (rank, worker) split, opening streams (local, ``pipe:``,
http(s), fsspec) with bounded reads, raw tar reading and sample counts.

A spec (``data.train`` / ``data.val``) is one or more sources joined with ``'::'``; each source is a brace pattern
(``cc12m/{00000..01242}.tar``, ``{a,b}.tar``), a glob, a single tar, a folder (its ``*.tar`` / ``*.tar.gz``,
sorted), a URL or ``pipe:COMMAND``.

Nothing here decodes an image: this module deals in raw samples, ``dict(__key__, __shard__, ext -> bytes)``, as
webdataset names them (the key is a member's name up to its first '.', the extension the rest: ``0001.sem.npy``
-> key ``0001``, extension ``sem.npy``).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import logging
import os
import select
import signal
import subprocess
import tarfile
import threading
import time
import zlib
from dataclasses import dataclass
from urllib.parse import urlparse
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from alignclip.braces import expand_braces
from alignclip.errors import ConfigError
from alignclip.fs import atomic_write

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- spec parsing
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def expand_spec(spec: str) -> list[str]:
    """Every shard of ``expand_sources``, in one list."""
    return [shard for source in expand_sources(spec) for shard in source]


def source_weights(text: str, sources: int, key: str = "data.weights") -> list[float]:
    """``'1::0.5'`` -> [1.0, 0.5]: one upsampling factor per ``'::'`` source of ``data.train`` (OpenCLIP's
    ``--train-data-upsampling-factors``: each shard of a source is drawn with its source's factor as weight)."""
    try:
        weights = [float(w) for w in text.split("::")]
    except ValueError:
        raise ConfigError(f"key '{key}' is {text!r}; expected numbers joined with '::', e.g. '1::0.5'") from None
    if len(weights) != sources:
        raise ConfigError(f"key '{key}' gives {len(weights)} weight(s) for the {sources} '::' source(s) of "
                          f"'data.train'; give one per source")
    if any(not w >= 0 for w in weights) or not any(weights):
        raise ConfigError(f"key '{key}' is {text!r}; weights must be >= 0 and not all 0")
    return weights


def expand_sources(spec: str) -> list[list[str]]:
    """Every shard a spec names, source by source, in spec order (sources in ``'::'`` order, each expanded and folders sorted).

    Raises ``FileNotFoundError`` naming the source when a local source matches nothing. Listed shards that do not
    exist (deleted since the listing was written, or mid-run) stay in the list, with a warning: they are counted
    as ``unreadable_shard`` when read, and the others keep their places in the epoch's order."""
    sources: list[list[str]] = []
    for source in (s.strip() for s in spec.split("::")):
        if not source:
            continue
        if is_remote(source):  # a URL or a shell command, taken as is
            sources.append(expand_braces(source))
            continue
        found: list[str] = []
        for item in expand_braces(os.path.expanduser(source)):
            if os.path.isdir(item):
                found.extend(sorted(p for p in glob.glob(os.path.join(item, "*")) if p.endswith(SHARD_SUFFIXES)))
            elif any(ch in item for ch in "*?["):
                found.extend(sorted(glob.glob(item)))
            else:
                found.append(item)
        missing = [p for p in found if not os.path.exists(p)]
        if not found or len(missing) == len(found):
            raise FileNotFoundError(f"shard source '{source}' matches no shard file (*.tar, *.tar.gz)"
                                    + (f", e.g. {missing[:3]} do not exist" if missing else ""))
        if missing:
            log.warning("data: shard source '%s': %d of %d shards do not exist, e.g. %s; they are skipped and "
                        "counted as unreadable_shard", source, len(missing), len(found), missing[:3])
        sources.append(found)
    return sources


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
            raise ConfigError(
            f"key '{spec_key}' names {len(shards)} shard(s) but {world_size} rank(s) x {max(num_workers, 1)} "
            f"worker(s) (key 'data.workers') = {readers} readers each need at least one: lower 'data.workers', "
            f"set 'data.resampled=true', or write more, smaller shards (tools/make_shards.py)")


def slot_shards(shards: Sequence[str], slot: Slot, seed: int, epoch: int) -> list[str]:
    """This reader's share of a plain list for this epoch: every ``slot.count``-th shard of the epoch order."""
    return epoch_shard_order(shards, seed, epoch)[slot.index::slot.count]


# ---------------------------------------------------------------------------- interruptible start-up reads
REQUEUE_EXIT_CODE = 124  # the trainer's "stopped cleanly, requeue me" (alignclip.training.preemption)
_STARTUP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1", "SIGUSR2")
                         if hasattr(signal, name))
_POLL_S = 0.25  # a blocked read or back-off looks at the signals this often
_received: list[int] = []  # signals received inside ``interruptible``; empty elsewhere (and in loader workers)
_progress: list[str] = [""]  # what the innermost ``interruptible`` is doing, for the message
_raise_in_handler = [False]  # True while blocked in a read that our checks cannot interrupt


class Interrupted(SystemExit):
    """A preemption signal arrived during start-up reading (the sample count): nothing was trained, so nothing is
    saved, and the process leaves with the requeue code. A ``SystemExit``, so every caller (the trainer, a
    submitit job, a tool) ends with 124 without having to know this module."""

    def __init__(self, message: str):
        super().__init__(REQUEUE_EXIT_CODE)
        self.message = message

    def __str__(self) -> str:
        return self.message


@contextlib.contextmanager
def interruptible(what: str) -> Iterator[None]:
    """While inside, the preemption signals (TERM, INT, HUP, USR1, USR2) are recorded -- and handed on to the
    handler installed before (the trainer's flag) -- and ``check_interrupted`` raises ``Interrupted`` at the next
    check: between shards and samples, and every ``_POLL_S`` of a blocked remote read or retry back-off. Without
    this, a SIGTERM during a count of dead shards waited for every timeout (minutes per shard) and Slurm's grace
    period ended in SIGKILL. Main thread only (elsewhere a no-op: signals reach the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, object] = {}

    def record(signum, frame) -> None:
        _received.append(signum)
        chained = previous.get(signum)
        if callable(chained) and chained is not signal.default_int_handler:
            chained(signum, frame)
        if _raise_in_handler[0]:  # blocked in a foreign read (fsspec): no check of ours would run
            check_interrupted()

    for sig in _STARTUP_SIGNALS:
        handler = signal.getsignal(sig)
        if handler is None or handler == signal.SIG_IGN:  # installed outside Python, or ignored on purpose
            continue
        previous[sig] = handler
        signal.signal(sig, record)
    _progress[:] = [what]
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _received.clear()


def check_interrupted(done: str = "") -> None:
    """Raise ``Interrupted`` when a preemption signal arrived inside ``interruptible``; else nothing (cheap)."""
    if _received:
        name = signal.Signals(_received[0]).name
        message = (f"{name} during {_progress[0]}{' after ' + done if done else ''}: nothing was trained, nothing "
                   f"saved; exit {REQUEUE_EXIT_CODE} (requeue)")
        _received.clear()
        log.error("data: %s", message)
        raise Interrupted(message)


def interruptible_sleep(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        check_interrupted()
        time.sleep(min(left, _POLL_S))


# ------------------------------------------------------------------------------------------- opening streams
@dataclass(frozen=True)
class StreamPolicy:
    """How long to wait for a remote or ``pipe:`` stream and how often to try again (``data.io_timeout_s``,
    ``data.io_retries``). A shard that fails before its first sample is re-opened up to ``retries`` times after
    ``backoff_s`` (doubling); one that fails later keeps what it gave (the samples cannot be un-yielded)."""

    timeout_s: float = 60.0
    retries: int = 2
    backoff_s: float = 1.0


class StalledRead(OSError):
    """A remote or pipe stream gave no byte for ``timeout_s`` seconds."""


class TruncatedTar(OSError):
    """A tar that ends without its end-of-archive blocks (cut at, or inside, a member header)."""


_CURL_EXITS = {6: "host not found", 7: "cannot connect (connection refused?)", 22: "HTTP error (404 or another "
               "status >= 400)", 28: "timed out", 35: "TLS handshake failed", 52: "empty reply", 56: "connection "
               "reset"}


def is_remote(shard: str) -> bool:
    return shard.startswith("pipe:") or "://" in shard and not shard.startswith("file:")


class BoundedStream(io.RawIOBase):
    """A raw read stream with a deadline per read for subprocess-backed sources (``pipe:`` and curl for http(s)).

    webdataset's ``Pipe`` reads its subprocess's stdout with no bound (a stalled server or command blocks the
    reader, and a SIGTERM with it, forever) and only checks the exit status on close. Here each read first waits
    at most ``timeout_s`` for data (``select`` on the pipe), and at end of stream the exit status is checked, so
    a 404 or a failed command is an error naming the URL, not an empty shard. Other streams (local files, fsspec)
    are read as they are: fsspec's file systems have their own timeouts (e.g. s3fs' ``config_kwargs``)."""

    def __init__(self, stream, url: str, timeout_s: float):
        super().__init__()
        self.stream, self.url, self.timeout_s = stream, url, timeout_s
        self.proc = getattr(stream, "proc", None)  # webdataset's Pipe keeps its Popen and stdout here
        self.raw = getattr(stream, "stream", None) if self.proc is not None else None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def read(self, size: int = -1) -> bytes:
        if self.raw is None:
            return _foreign(self.stream.read, size)
        deadline = time.monotonic() + self.timeout_s
        while True:  # in slices, so a start-up count notices a preemption signal within a slice
            check_interrupted()
            left = deadline - time.monotonic() if self.timeout_s > 0 else _POLL_S
            if left <= 0:
                raise StalledRead(f"no data for {self.timeout_s:g} s (data.io_timeout_s)")
            if select.select([self.raw], [], [], min(left, _POLL_S))[0]:
                break
        data = self.raw.read(size if size and size > 0 else 1 << 16)
        if not data:
            status = self.proc.wait(timeout=self.timeout_s or None)
            if status not in (0, 141):  # 141: the reader closed the pipe early (SIGPIPE), as webdataset allows
                if self.proc.args and isinstance(self.proc.args, list) and self.proc.args[0] == "curl":
                    raise OSError(f"curl exit {status}: {_CURL_EXITS.get(status, 'transfer failed')}")
                raise OSError(f"command exited with status {status}")
        return data

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:  # stalled or left early: do not wait for it (Pipe.close waits 2 h)
                self.proc.kill()
            self.proc.wait()
            self.raw.close()  # Pipe.close, also from its __del__, then finds the stream closed and does nothing
        else:
            try:
                self.stream.close()
            except Exception:  # closing a half-read remote file must not hide the error that stopped us
                pass
        super().close()


def _foreign(call, *args):
    """``call(*args)`` of code that is not ours (a local file's read, fsspec's open and read): any failure becomes
    an OSError (a ``StalledRead`` after a timeout) so the reader counts it -- s3fs, for one, ends a read that timed
    out with an IndexError from its own error handling. Inside ``interruptible``, a preemption signal ends the call
    at once (fsspec waits for its event-loop thread, where no check of ours can run)."""
    _raise_in_handler[0] = True
    try:
        return call(*args)
    except (OSError, Interrupted):
        raise
    except Exception as err:  # noqa: BLE001 - see the docstring
        chain, cause = [], err
        while cause is not None and len(chain) < 10:
            chain.append(cause)
            cause = cause.__cause__ or cause.__context__
        if any(isinstance(e, TimeoutError) or "timeout" in type(e).__name__.lower() for e in chain):
            raise StalledRead(f"timed out ({type(err).__name__} after {chain[-1]!r})") from err
        raise OSError(f"{type(err).__name__}: {err}") from err
    finally:
        _raise_in_handler[0] = False


def _fsspec_fs(url: str, timeout_s: float):
    """(fsspec file system, path) for ``url``; s3fs' own timeouts follow data.io_timeout_s and its retries give
    way to ours (``data.io_retries`` in ``iter_raw_samples``; s3fs would retry a timed-out read 5 more times)."""
    import fsspec

    if urlparse(url).scheme == "s3":
        fs = fsspec.filesystem("s3", config_kwargs={"read_timeout": max(timeout_s, 1),
                                                    "connect_timeout": max(timeout_s, 1)})
        fs.retries = 1
        return fs, url
    return fsspec.core.url_to_fs(url)


def _fsspec_stream(url: str, timeout_s: float):
    fs, path = _fsspec_fs(url, timeout_s)
    return fs.open(path, "rb")


def open_shard(url: str, timeout_s: float = 60.0) -> BoundedStream:
    """A read stream for a local path, ``file:``, ``pipe:COMMAND``, ``http(s)://`` or any fsspec URL (``s3://`` needs
    the ``s3`` extra: s3fs). Raises OSError (FileNotFoundError for a missing local file)."""
    from webdataset.gopen import Pipe, gopen, gopen_schemes

    scheme = "pipe" if url.startswith("pipe:") else urlparse(url).scheme if "://" in url else ""
    if scheme in ("http", "https"):
        # webdataset's gopen_curl is this Pipe with fixed flags (30 retries 2 s apart, 30 s connect timeout, no
        # bound on a stalled transfer); ours must follow data.io_timeout_s / io_retries, so only the flags differ.
        stream = Pipe(["curl", "--fail", "--silent", "--location", "--connect-timeout", f"{max(timeout_s, 1):g}",
                       url], mode="rb", bufsize=0, ignore_status=[141, 23], stderr=subprocess.DEVNULL)
    elif scheme in ("", "file", "pipe") or scheme in gopen_schemes:
        stream = gopen(url, "rb", bufsize=0)  # local, pipe: (unbuffered, for the deadline), gs:, hf: ...
    else:
        try:
            import fsspec
        except ImportError as err:  # pragma: no cover - fsspec comes with webdataset's extras / huggingface
            raise OSError(f"{url}: reading {scheme}:// needs fsspec (pip install 'alignclip[s3]')") from err
        try:
            stream = _foreign(_fsspec_stream, url, timeout_s)
        except ImportError as err:  # e.g. s3:// without s3fs
            raise OSError(f"{url}: {err} (for s3:// install the s3 extra: pip install 'alignclip[s3]')") from err
    return BoundedStream(stream, url, timeout_s)


# --------------------------------------------------------------------------------------------- tar reading
class ShardErrors:
    """Counts of what a reader skipped; plain ints so they travel with a batch from a worker process."""

    FIELDS = ("samples_read", "corrupt_image", "too_large_image", "missing_image", "empty_caption",
              "undecodable_caption", "missing_semantic", "bad_semantic", "truncated_shard", "unreadable_shard",
              "stalled_shard", "shard_retries", "wrapped_passes")
    _QUIET = ("samples_read", "wrapped_passes", "shard_retries")

    def __init__(self, quiet: bool = False) -> None:
        self.counts = {name: 0 for name in self.FIELDS}
        self._logged = 20 if quiet else 0  # quiet: counts only (a caller that reports them itself)

    def skipped(self) -> dict[str, int]:
        """{reason: count} of what was skipped or failed (no zeros, no plain counters): what a report states."""
        return {k: v for k, v in self.counts.items() if v and k not in self._QUIET}

    def add(self, name: str, detail: str = "", n: int = 1) -> None:
        self.counts[name] += n
        if detail and name not in self._QUIET and self._logged < 20:
            self._logged += 1  # the counts keep growing; the log shows the first few of each reader
            log.warning("data: skipped (%s) %s", name, detail)


def split_member_name(name: str) -> tuple[str, str]:
    """``dir/0001.sem.npy`` -> (``dir/0001``, ``sem.npy``): webdataset's rule (``base_plus_ext``: the key ends at
    the basename's first '.'), extension lower-cased; a name without one gives an empty extension."""
    from webdataset.tariterators import base_plus_ext

    key, ext = base_plus_ext(name)
    return (name, "") if key is None else (key, ext.lower())


def _members(shard: str, policy: StreamPolicy, progress: list[int]) -> Iterator[tuple[str, str, bytes]]:
    """(key, extension, bytes) of each sample member, in tar order. ``progress[0]`` counts the members read.

    Our loop, not webdataset's ``tar_file_iterator``: telling a shard cut at a member boundary (which Python's
    tarfile, in stream mode, takes for a normal end) needs the archive's offset after the last member, and the
    error accounting needs to know how far a damaged shard got."""
    stream = open_shard(shard, policy.timeout_s)
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:  # '*': plain or compressed (.tar.gz)
            for member in tar:
                tar.members = []  # stream mode would keep every header of a 10,000-sample shard otherwise
                if not member.isfile():
                    continue
                key, ext = split_member_name(member.name)
                if not ext or key.startswith("__") or os.path.basename(key).startswith("."):
                    continue
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                progress[0] += 1
                yield key, ext, data
            # A complete archive ends with two zero blocks (and padding); a cut one simply stops.
            while tar.fileobj.read(1 << 16):
                pass
            end = tar.fileobj.tell()
            if end - tar.offset < tarfile.BLOCKSIZE:
                raise TruncatedTar(f"ends at byte {end} without the end-of-archive blocks")
    finally:
        stream.close()


_READ_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, ValueError)


def iter_raw_samples(shard: str, errors: ShardErrors | None = None,
                     policy: StreamPolicy = StreamPolicy()) -> Iterator[dict]:
    """Group consecutive tar members by key into ``dict(__key__, __shard__, ext -> bytes)``.

    A stream that fails before its first sample is retried (remote and ``pipe:`` sources, ``policy``); then, and
    for any later damage, it is counted (``stalled_shard`` for a stall, ``truncated_shard`` after some members,
    ``unreadable_shard`` before any), logged with the URL, and the shard ends; the members read before the damage
    are kept (each was read completely)."""
    attempts = policy.retries + 1 if is_remote(shard) else 1
    for attempt in range(attempts):
        current: dict | None = None
        progress, yielded = [0], False
        members = _members(shard, policy, progress)
        try:
            for key, ext, data in members:
                if current is not None and current["__key__"] != key:
                    yielded = True
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key, "__shard__": shard}
                current[ext] = data
        except _READ_ERRORS as err:
            if not yielded and attempt + 1 < attempts:
                if errors is not None:
                    errors.add("shard_retries")
                log.warning("data: %s failed (%r); retry %d of %d", shard, err, attempt + 1, policy.retries)
                interruptible_sleep(policy.backoff_s * 2 ** attempt)
                continue
            kind = ("stalled_shard" if isinstance(err, (StalledRead, TimeoutError))
                    else "truncated_shard" if progress[0] else "unreadable_shard")
            detail = f"{shard} after {progress[0]} members: {err!r}"
            if errors is not None:
                errors.add(kind, detail)
            else:
                log.warning("data: %s %s", kind, detail)
        finally:
            members.close()  # kill a curl / pipe: process now, not when the generator is collected
        if current is not None:
            yield current
        return


# ------------------------------------------------------------------------------------------ sample counts
def _read_small(url: str, timeout_s: float) -> bytes | None:
    """A small metadata file beside the shards (local or remote), or None when it is absent or unreadable."""
    try:
        if not is_remote(url):
            return Path(url).read_bytes() if os.path.isfile(url) else None
        with open_shard(url, timeout_s) as stream:
            chunks = []
            while chunk := stream.read(1 << 16):
                chunks.append(chunk)
            return b"".join(chunks)
    except (OSError, ValueError):
        return None


def _sibling(shard: str, name: str) -> str:
    head, sep, _ = shard.rpartition("/")
    return f"{head}{sep}{name}"


def _shard_stem(shard: str) -> str:
    base = shard.rpartition("/")[2]
    for suffix in SHARD_SUFFIXES:
        if base.endswith(suffix):
            return base[:-len(suffix)]
    return base


def metadata_count(shards: Sequence[str], timeout_s: float = 60.0) -> int | None:
    """Samples in the shards from the files written beside them, without reading a tar: webdataset's
    ``sizes.json`` ({shard file name: samples}) in a shard's folder, else img2dataset's ``NNNNN_stats.json``
    (``successes``) next to each shard; local or remote. None when some shard has neither (or for ``pipe:``)."""
    total = 0
    sizes_cache: dict[str, dict[str, int]] = {}
    for shard in shards:
        if shard.startswith("pipe:"):
            return None
        folder = shard.rpartition("/")[0]
        if folder not in sizes_cache:
            sizes_cache[folder] = {}
            raw = _read_small(_sibling(shard, "sizes.json"), timeout_s)
            if raw is not None:
                try:
                    sizes_cache[folder] = {str(k): int(v) for k, v in json.loads(raw).items()}
                except (ValueError, AttributeError, TypeError):
                    log.warning("data: ignoring unreadable %s", _sibling(shard, "sizes.json"))
        n = sizes_cache[folder].get(shard.rpartition("/")[2])
        if n is None:
            raw = _read_small(_sibling(shard, _shard_stem(shard) + "_stats.json"), timeout_s)
            try:
                n = int(json.loads(raw)["successes"]) if raw is not None else None
            except (ValueError, KeyError, TypeError):
                n = None
        if n is None:
            return None
        total += n
    return total


def stats_count(shard: str) -> int | None:
    """img2dataset's ``NNNNN_stats.json`` count for one shard (what ``validate`` compares with the tar)."""
    raw = _read_small(_sibling(shard, _shard_stem(shard) + "_stats.json"), 60.0)
    try:
        return int(json.loads(raw)["successes"]) if raw is not None else None
    except (ValueError, KeyError, TypeError):
        return None


def read_count(shards: Sequence[str], policy: StreamPolicy = StreamPolicy()) -> tuple[int, ShardErrors]:
    """Samples in the shards by reading every tar (slow on a big list), and what the reading skipped or failed."""
    errors = ShardErrors()
    total = 0
    for i, shard in enumerate(shards):
        check_interrupted(f"{i} of {len(shards)} shards")
        for _ in iter_raw_samples(shard, errors, policy):
            total += 1
            check_interrupted(f"{i} of {len(shards)} shards")
    return total, errors


_FAILED_READS = ("unreadable_shard", "stalled_shard", "truncated_shard")


def _run_bounded(command: list[str], timeout_s: float) -> tuple[int, bytes]:
    """(exit status, stdout) of a short command, killed after ``timeout_s``; interruptible like a read."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + max(timeout_s, 1)
    try:
        while proc.poll() is None:
            check_interrupted()
            if time.monotonic() > deadline:
                return -1, b""
            time.sleep(0.02)
        return proc.returncode, proc.stdout.read()  # type: ignore[union-attr]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]


def shard_identity(shard: str, timeout_s: float = 60.0) -> str | None:
    """What changes when a shard's content changes, without reading it: size and modification time (local),
    ETag / Content-Length / Last-Modified (http(s) HEAD, fsspec's ``info``). None when it cannot be told: the
    shard is missing or unreachable, a ``pipe:`` source, or a server that sends none of those headers."""
    if shard.startswith("pipe:"):
        return None
    scheme = urlparse(shard).scheme if "://" in shard else ""
    if scheme in ("", "file"):
        try:
            stat = os.stat(shard[len("file://"):] if shard.startswith("file://") else shard.removeprefix("file:"))
        except OSError:
            return None
        return f"size={stat.st_size} mtime_ns={stat.st_mtime_ns}"
    if scheme in ("http", "https"):
        status, out = _run_bounded(["curl", "--fail", "--silent", "--head", "--location", "--max-time",
                                    f"{max(timeout_s, 1):g}", shard], timeout_s + 5)
        if status != 0:
            return None
        last = out.decode("latin-1").replace("\r\n", "\n").strip().split("\n\n")[-1]  # after redirects
        headers = dict(line.split(":", 1) for line in last.splitlines()[1:] if ":" in line)
        found = {k.strip().lower(): v.strip() for k, v in headers.items()}
        parts = [f"{k}={found[k]}" for k in ("etag", "content-length", "last-modified") if k in found]
        return " ".join(parts) or None
    try:
        fs, path = _fsspec_fs(shard, timeout_s)
        info = _foreign(fs.info, path)
    except Exception:  # noqa: BLE001 - any failure means "cannot tell", and the count is then not cached
        return None
    parts = [f"{k}={info[k]}" for k in ("ETag", "etag", "size", "LastModified", "mtime") if info.get(k) is not None]
    return " ".join(parts) or None


def _describe_failures(errors: ShardErrors) -> str:
    failed = {k: errors.counts[k] for k in _FAILED_READS if errors.counts[k]}
    return ", ".join(f"{n} {k}" for k, n in failed.items())


def count_samples(shards: Sequence[str], policy: StreamPolicy = StreamPolicy(), cache_dir: str | Path = "",
                  ) -> tuple[int, str]:
    """(samples, where the figure came from -- the trainer logs it, and names it when the figure is refused).

    In order: the metadata beside the shards (``sizes.json`` / ``*_stats.json``); else a cached earlier count, a
    JSON file in ``cache_dir`` whose name is a hash of the shard list AND each shard's identity
    (``shard_identity``: size + mtime locally, ETag / Content-Length remotely), so a shard rewritten, added or
    removed gives another file and a recount; else reading every shard. A reading pass is cached only when every
    shard was identified and none failed (unreadable, stalled, truncated): a count from a storage blip is used
    for this start only. Preemption signals end it within a fraction of a second (``Interrupted``, exit 124)."""
    with interruptible(f"the start-up sample count of {len(shards)} shards"):
        n = metadata_count(shards, policy.timeout_s)
        if n is not None:
            return n, "sizes.json / *_stats.json beside the shards"
        cache, why_not = None, ""
        if cache_dir:
            identities = []
            for i, shard in enumerate(shards):
                check_interrupted(f"identifying {i} of {len(shards)} shards")
                identities.append(shard_identity(shard, policy.timeout_s))
            unknown = [s for s, ident in zip(shards, identities) if ident is None]
            if unknown:
                why_not = (f"not cached: {len(unknown)} shard(s) cannot be identified by size/mtime or "
                           f"ETag/Content-Length, e.g. {unknown[0]}")
            else:
                listing = "\n".join(f"{s}\t{ident}" for s, ident in zip(shards, identities))
                cache = Path(cache_dir) / f"count-{hashlib.sha256(listing.encode()).hexdigest()[:20]}.json"
        if cache is not None and cache.is_file():
            try:
                return (int(json.loads(cache.read_text())["samples"]),
                        f"the cached count {cache} (the shards' sizes and dates / ETags unchanged since)")
            except (ValueError, KeyError, TypeError, OSError):
                log.warning("data: ignoring the unreadable cached count %s", cache)
        n, errors = read_count(shards, policy)
    failed = _describe_failures(errors)
    if failed:
        why_not = f"not cached: {failed} during the count (see the warnings above)"
    elif cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            first = shards[0] if shards else ""
            atomic_write(cache, json.dumps({"samples": n, "shards": len(shards), "first": first}))
            why_not = f"cached in {cache}"
        except OSError as err:
            why_not = f"not cached: {err}"
            log.warning("data: cannot cache the sample count in %s: %s", cache, err)
    if failed:
        log.warning("data: the sample count of %d shards had %s; it is used for this start only (not cached)",
                    len(shards), failed)
    return n, f"reading the {len(shards)} shards" + (f" ({why_not})" if why_not else "")
