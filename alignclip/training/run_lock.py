"""One trainer per run directory: ``<run_dir>/run.lock``, taken by rank 0 for the run's whole life.

Two trainers on one run folder (a duplicate sbatch, a manual restart while the requeued job runs) would share
``latest``, train.log and tb/, and delete each other's partial checkpoints. The second one exits 2 at once, naming
the holder (host, PID, Slurm job id, start time, all inside the lock file).

Why not ``flock``: on NFS it is emulated (or silently local) depending on the client's mount options, so two nodes
can both "hold" it. The lock is a file created with ``O_CREAT | O_EXCL``, which NFSv3+ performs atomically on the
server, and the holder refreshes its mtime (a heartbeat thread, every ``HEARTBEAT_S``). A lock is stale when
  * its holder is on this host and its PID is gone, or
  * its Slurm job id is ours (a requeued job: Slurm starts it only after the old run ended), or
  * its heartbeat is older than ``STALE_AFTER_S`` (a holder on a node that died).
A stale lock is taken over with a warning: renamed away (one rename wins when two trainers race for it), then
created anew. The lock is removed when the run ends (``release``), whatever the exit code.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from alignclip.config import ConfigError

LOCK_FILE = "run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 10 * HEARTBEAT_S


class RunLockedError(ConfigError):
    """Another live trainer holds the run directory (exit 2, naming it)."""


def _holder_text(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def describe_holder(holder: dict) -> str:
    job = f", Slurm job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return (f"host {holder.get('host', '?')}, PID {holder.get('pid', '?')}{job}, since "
            f"{holder.get('started', '?')}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def stale_reason(path: Path, holder: dict, now: Optional[float] = None) -> Optional[str]:
    """Why the lock at ``path`` is stale, or None when its holder may be alive."""
    now = time.time() if now is None else now
    job = os.environ.get("SLURM_JOB_ID", "")
    if job and holder.get("slurm_job_id") == job:
        return f"it is this Slurm job's (a requeue: job {job} ran before)"
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) \
            and not _pid_alive(holder["pid"]):
        return f"PID {holder['pid']} is gone"
    try:
        age = now - path.stat().st_mtime
    except OSError:
        return "it vanished"
    if age > STALE_AFTER_S:
        return f"no heartbeat for {age:.0f} s (more than {STALE_AFTER_S:.0f} s)"
    if not holder:
        return None  # being written this instant, or unreadable: treat as held until it goes quiet
    return None


class RunLock:
    """``RunLock.acquire(run_dir)`` or ``RunLockedError``; ``release()`` at the end."""

    def __init__(self, path: Path):
        self.path = path
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @classmethod
    def acquire(cls, run_dir: Path, warn: Callable[[str], None] = print) -> "RunLock":
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / LOCK_FILE
        me = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        for _ in range(3):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _holder_text(path)
                reason = stale_reason(path, holder)
                if reason is None:
                    raise RunLockedError(f"run directory {run_dir} is in use by another trainer "
                                         f"({describe_holder(holder)}; lock {path}). Stop that one first, or use "
                                         f"another run_dir. If it is gone for sure, delete {path}.") from None
                aside = path.with_name(f"{LOCK_FILE}.stale.{os.getpid()}")
                try:
                    os.rename(path, aside)  # one of several racing trainers wins this
                except FileNotFoundError:
                    continue
                aside.unlink(missing_ok=True)
                warn(f"warning: took over the stale lock {path} ({describe_holder(holder)}): {reason}")
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
                f.flush()
                os.fsync(f.fileno())
            lock = cls(path)
            lock._start_heartbeat()
            return lock
        raise RunLockedError(f"could not take the lock {path}: other trainers keep taking it")

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(HEARTBEAT_S):
                try:
                    os.utime(self.path)
                except OSError:
                    pass

        self._thread = threading.Thread(target=beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        holder = _holder_text(self.path)
        if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)
