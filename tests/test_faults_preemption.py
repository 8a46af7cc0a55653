"""Fault injection: preemption signals with DataLoader workers (``data.workers > 0``, as every recipe runs).

Slurm and ``kill -TERM -- -PGID`` signal every process of the job step, the loader's workers included. The workers
must ignore the signal, the trainer must save, shut its workers down and exit 124, and the resumed run must end with
the weights of an uninterrupted one. (The same on real Slurm, through every scancel route: test_launch_slurm.py.)
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from tests.helpers import REPO_ROOT
from tests.helpers.launch import final_weights, job_env, job_overrides, max_weight_difference, trainer_state
from alignclip.distributed.process import PREEMPTION_SIGNALS, ignore_preemption_signals
from alignclip.training.preemption import REQUEUE_EXIT_CODE, PreemptionFlag

STEPS = 30
TIMEOUT_S = 300  # hang guard only
LOADER = {"data.workers": 2, "data.generated.num_shards": 4, "data.generated.samples_per_shard": 16}


class _Pids(IterableDataset):
    def __iter__(self):
        while True:
            yield torch.tensor(os.getpid())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_the_trainer_handler_covers_term_usr1_usr2_int_and_hup():
    assert set(PREEMPTION_SIGNALS) == {signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT, signal.SIGHUP}
    flag = PreemptionFlag()
    try:
        for sig in PREEMPTION_SIGNALS:
            flag.received = None
            os.kill(os.getpid(), sig)
            deadline = time.monotonic() + 10
            while flag.received is None and time.monotonic() < deadline:  # delivered between bytecodes
                time.sleep(0.01)
            assert flag.received == sig and flag.agree()
    finally:
        flag.restore()


def test_a_real_dataloader_worker_survives_every_preemption_signal_and_is_shut_down_after():
    loader = DataLoader(_Pids(), batch_size=None, num_workers=1, worker_init_fn=ignore_preemption_signals)
    batches = iter(loader)
    worker = int(next(batches))
    assert worker != os.getpid()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the kernel delivers to the worker only; be safe
    try:
        for sig in PREEMPTION_SIGNALS:
            os.kill(worker, sig)
        for _ in range(20):  # without the worker_init_fn: "DataLoader worker ... killed by signal: Terminated"
            assert int(next(batches)) == worker
    finally:
        signal.signal(signal.SIGINT, previous)
    del batches  # the loader's clean shutdown: the worker exits by itself
    deadline = time.monotonic() + 60
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(worker)


def _signalled_before_init(worker_id: int) -> None:
    """A preemption signal that reaches a just-forked worker before its worker_init_fn ignores the signals (the
    window a scancel of the whole step hit under load): sent by the worker to itself, then the real init."""
    os.kill(os.getpid(), signal.SIGTERM)
    ignore_preemption_signals(worker_id)


def test_a_signal_reaching_a_training_worker_before_its_init_is_held_and_discarded(tmp_path, monkeypatch):
    import alignclip.data.pipeline as pipeline
    from alignclip.config import load_config
    from alignclip.data import build_train_loader
    from tests.helpers.tiny import tiny_overrides, write_toy_shards

    data = {"train": write_toy_shards(tmp_path / "train", num_shards=2, per_shard=16),
            "val": write_toy_shards(tmp_path / "val", num_shards=1, per_shard=16, seed=1)}
    config = load_config(None, tiny_overrides(data, tmp_path / "run", **{"data.workers": 2}))
    monkeypatch.setattr(pipeline, "ignore_preemption_signals", _signalled_before_init)
    # without the signals blocked while the workers start: "DataLoader worker ... killed by signal: Terminated"
    batches = list(build_train_loader(config, 0, 1, 0))
    assert len(batches) == 2 and all(len(b["caption"]) == 16 for b in batches)


_CRASH_WITH_A_LIVE_LOADER = """
import torch
from torch.utils.data import DataLoader, IterableDataset
from alignclip.distributed.process import ignore_preemption_signals, preemption_signals_blocked

class Forever(IterableDataset):
    def __iter__(self):
        while True:
            yield torch.zeros(1)

def run():
    loader = DataLoader(Forever(), batch_size=None, num_workers=2, worker_init_fn=ignore_preemption_signals)
    with preemption_signals_blocked():
        batches = iter(loader)
    next(batches)
    raise RuntimeError("a crash while the loader's iterator is alive")

run()
"""


def test_a_crash_with_a_live_loader_iterator_exits_and_takes_its_workers_along():
    """The iterator lives on in the traceback; its workers ignore the SIGTERM of multiprocessing's exit handler,
    which then joined them forever (the process never ended). Killed at exit instead: exit 1 at once."""
    proc = subprocess.Popen([sys.executable, "-c", _CRASH_WITH_A_LIVE_LOADER], env={**os.environ, **job_env()},
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=120)  # hang guard: before the fix, it never returned
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1 and "a crash while the loader's iterator is alive" in output, output[-3000:]
    _assert_group_ends(proc.pid, "a worker outlived the crashed process")


def _assert_group_ends(pgid: int, failure: str, within_s: float = 60) -> None:
    """Wait (bounded) until no process of the group is left: the workers must not outlive their trainer."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    pytest.fail(failure)


# ------------------------------------------------------------------------------- the trainer, heavy
def _command(run_dir: Path, cache: Path) -> list[str]:
    return [sys.executable, "-m", "alignclip.train",
            *job_overrides(cache, run_dir, **{"train.max_steps": STEPS, **LOADER})]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pgid")
    done = subprocess.run(_command(root / "straight", root / "data"), env={**os.environ, **job_env()},
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "straight", root / "data"


@pytest.mark.heavy
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_process_group_signal_with_loader_workers_saves_exits_124_and_resumes_exactly(uninterrupted, tmp_path, sig):
    """``kill -SIG -- -PGID``: the trainer and its two loader workers all get the signal."""
    run_dir, cache = tmp_path / "run", uninterrupted[1]
    proc = subprocess.Popen(_command(run_dir, cache), env={**os.environ, **job_env()}, cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    train_log = run_dir / "train.log"
    deadline = time.monotonic() + TIMEOUT_S
    while not (train_log.exists() and re.search(r"INFO step [3-9] ", train_log.read_text())):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, sig)
    output, _ = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == REQUEUE_EXIT_CODE, output[-3000:]
    assert "killed by signal" not in output and "Traceback" not in output, output[-3000:]
    _assert_group_ends(proc.pid, "processes of the trainer's group are still alive after it exited")
    saved = re.search(rf"preempted \({sig.name} received by this rank\): saved .*step_(\d+) at step (\d+)",
                      train_log.read_text())
    assert saved and 3 <= int(saved.group(2)) < STEPS, train_log.read_text()[-2000:]
    assert not list((run_dir / "checkpoints").glob("*.tmp"))

    done = subprocess.run(_command(run_dir, cache), env={**os.environ, **job_env()}, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    assert trainer_state(run_dir)["step"] == STEPS
    difference = max_weight_difference(final_weights(run_dir), final_weights(uninterrupted[0]))
    print(f"{sig.name} to the process group at step {saved.group(2)}: resumed vs uninterrupted max |diff| = "
          f"{difference:.3g}")
    assert difference <= 1e-6
