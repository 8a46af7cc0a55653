"""Trainer processes as srun would start them: launch ``python -m alignclip.train`` per rank, wait, compare."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests.helpers import REPO_ROOT
from tests.helpers.ranks import free_port


def child_env(**extra) -> dict[str, str]:
    """This environment for a child trainer: the checkout importable, one thread, offline, no inherited ranks."""
    env = dict(os.environ)
    env.update(PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK"):
        env.pop(key, None)
    env.update(extra)
    return env


def default_signals() -> None:
    """``preexec_fn`` for a child the test will signal: the preemption signals at their default disposition. A
    suite started in the background (``&`` ignores SIGINT) or under ``nohup`` (SIGHUP) passes the ignoring on, and
    the code under test rightly leaves an ignored signal ignored: the test would wait for a stop that never comes."""
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_DFL)


def launch(overrides: list[str], world_size: int = 1, log_dir: Path | None = None) -> list[subprocess.Popen]:
    """``python -m alignclip.train`` once per rank, with the torchrun variables set as srun's tasks would have."""
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = child_env(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        out = open(log_dir / f"rank{rank}.out", "ab") if log_dir else subprocess.DEVNULL
        procs.append(subprocess.Popen([sys.executable, "-m", "alignclip.train", *overrides], env=env,
                                      stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                      preexec_fn=default_signals))
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float = 240) -> list[int]:
    deadline = time.time() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1.0, deadline - time.time())))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    return codes


def wait_for(predicate, procs: list[subprocess.Popen], timeout: float = 120, poll: float = 0.005) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"a rank ended before the condition held: {[p.poll() for p in procs]}")
        if time.time() > deadline:
            for p in procs:
                p.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(poll)


def latest_step(run_dir: Path) -> int:
    pointer = run_dir / "checkpoints" / "latest"
    return int(pointer.read_text().strip().split("_")[1]) if pointer.is_file() else 0


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, f"weights differ by up to {worst:.3g} (tolerance {atol})"


# ------------------------------------------------------------------------------- multi-rank equivalence
