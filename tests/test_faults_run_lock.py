"""Fault injection: two trainers on one run folder (a duplicate sbatch, a manual restart while the requeued job
runs). The first holds ``run.lock`` for the run's life; the second exits 2 at once naming the holder (host, PID,
Slurm job id); a stale lock (its holder gone, its job requeued, or silent past the heartbeat limit) is taken over
with a warning."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alignclip.training import run_lock
from alignclip.training.run_lock import LOCK_FILE, RunLock, RunLockedError
from tests.helpers import REPO_ROOT
from tests.helpers.processes import child_env
from tests.helpers.tiny import tiny_overrides


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # reaped: no process has it (PIDs are not reused this fast)


def _plant(run: Path, **holder) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    path = run / LOCK_FILE
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": "",
                                "started": "2026-01-01T00:00:00Z", **holder}))
    return path


def test_the_lock_is_exclusive_and_names_its_holder_then_is_released(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    lock = RunLock.acquire(tmp_path / "run")
    holder = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    monkeypatch.setenv("SLURM_JOB_ID", "4243")  # another job, same folder
    with pytest.raises(RunLockedError, match=rf"in use by another trainer \(host {socket.gethostname()}, PID "
                                             rf"{os.getpid()}, Slurm job 4242"):
        RunLock.acquire(tmp_path / "run")
    lock.release()
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    RunLock.acquire(tmp_path / "run").release()


@pytest.mark.parametrize("holder, reason", [
    ({"pid": "dead"}, r"PID \d+ is gone"),
    ({"slurm_job_id": "777"}, "this Slurm job's"),  # the requeued job itself
    ({"host": "another-node", "heartbeat_age": 10 * run_lock.HEARTBEAT_S + 5}, "no heartbeat"),
], ids=["dead-pid", "requeued-job", "silent-node"])
def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, monkeypatch, holder, reason):
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    holder = dict(holder)
    age = holder.pop("heartbeat_age", 0)
    if holder.get("pid") == "dead":
        holder["pid"] = _dead_pid()
    if "slurm_job_id" not in holder:
        holder["slurm_job_id"] = "1"
    path = _plant(tmp_path / "run", **holder)
    if age:
        os.utime(path, (time.time() - age, time.time() - age))
    warnings: list[str] = []
    lock = RunLock.acquire(tmp_path / "run", warn=warnings.append)
    assert len(warnings) == 1 and re.search(reason, warnings[0]) and "took over the stale lock" in warnings[0]
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()


def test_a_live_holder_on_another_node_keeps_its_lock(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    _plant(tmp_path / "run", host="another-node", pid=1, slurm_job_id="9")  # heartbeat fresh (just written)
    with pytest.raises(RunLockedError, match="host another-node, PID 1, Slurm job 9"):
        RunLock.acquire(tmp_path / "run")


@pytest.mark.heavy
def test_a_second_trainer_on_the_run_folder_exits_2_at_once_naming_the_first(tmp_path):
    run = tmp_path / "run"
    # long enough that it is still training when the second one (slow to start on a busy machine) is refused
    overrides = tiny_overrides(tmp_path / "data", run, **{"train.max_steps": 100000, "train.epochs": 50000})
    first = subprocess.Popen([sys.executable, "-m", "alignclip.train", *overrides], env=child_env(), cwd=REPO_ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not ((run / "train.log").exists() and " step 1 " in (run / "train.log").read_text()):
            assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()[-3000:]
            time.sleep(0.05)
        # the second one's shards do not exist: it is refused by the lock before its plan reads any shard (a
        # start-up count of a big remote dataset would otherwise come first)
        nowhere = [o if not o.startswith("data.train=") else f"data.train={tmp_path / 'nowhere'}/{{00000..00001}}.tar"
                   for o in overrides]
        second = subprocess.run([sys.executable, "-m", "alignclip.train", *nowhere], env=child_env(),
                                cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"PID {first.pid}" in second.stderr and "in use by another trainer" in second.stderr
        assert "Traceback" not in second.stderr
        assert first.poll() is None  # the first one trains on, untouched
    finally:
        os.killpg(first.pid, signal.SIGTERM)
        first.communicate(timeout=300)
    assert first.returncode == 124
    assert not (run / LOCK_FILE).exists()  # released on the way out
