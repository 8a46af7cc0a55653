"""Fault injection: the data source fails after training started.

Every shard gone mid-run (the readers exhausted by I/O errors), a DataLoader worker SIGKILLed (as the OOM killer
does), a DataLoader timeout, and on two ranks one rank's reader dying: the trainer saves the last completed step,
prints one line naming the cause and exits 124 (requeue) -- every rank, with no hang -- and the resumed run ends
with the weights of an uninterrupted one.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT
from tests.helpers.launch import final_weights, max_weight_difference, trainer_state
from tests.helpers.processes import child_env
from tests.helpers.shard_server import serve
from tests.helpers.tiny import tiny_overrides, write_toy_shards

STEPS = 24  # 3 epochs of 8 steps (4 shards x 32 samples, batch 16)
TIMEOUT_S = 300  # hang guard only


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("data")
    return {"train": write_toy_shards(root / "train", num_shards=4, per_shard=32),
            "val": write_toy_shards(root / "val", num_shards=1, per_shard=16, seed=1)}


def _overrides(data: dict, run: Path, **extra) -> list[str]:
    return tiny_overrides(data, run, **{"train.max_steps": STEPS, "checkpoint.every_steps": 1000,
                                        "logging.gap_every_steps": 0, **extra})


def _start(overrides: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "alignclip.train", *overrides], env=child_env(), cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for_step(proc: subprocess.Popen, run: Path, step: int) -> None:
    log, deadline = run / "train.log", time.monotonic() + TIMEOUT_S
    while not (log.exists() and re.search(rf"INFO step {step} ", log.read_text())):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.005)


def _finish(proc: subprocess.Popen) -> str:
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return output


def _assert_saved_and_requeued(proc: subprocess.Popen, output: str, run: Path, cause: str, first: int = 2) -> int:
    """Exit 124 with the last step saved, ``first`` or later (the step the fault was made after)."""
    assert proc.returncode == 124, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    log = (run / "train.log").read_text()
    saved = re.search(rf"data source failed on this rank: [^\n]*(?:{cause})[^\n]*: saved \S+step_(\d+) at step "
                      rf"(\d+); exiting with 124", log)
    assert saved, log[-3000:]
    step = int(saved.group(2))
    assert first <= step < STEPS and trainer_state(run)["step"] == step
    assert not list((run / "checkpoints").glob("*.tmp"))
    return step


@pytest.fixture(scope="module")
def uninterrupted(toy_data, tmp_path_factory):
    """``uninterrupted(**extra)``: the same run without a fault (the data order depends on the loader workers and
    the shuffle buffer), trained once per module."""
    runs: dict[tuple, Path] = {}

    def run(**extra) -> Path:
        key = tuple(sorted(extra.items()))
        if key not in runs:
            path = tmp_path_factory.mktemp("straight") / "run"
            done = subprocess.run([sys.executable, "-m", "alignclip.train", *_overrides(toy_data, path, **extra)],
                                  env=child_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
            assert done.returncode == 0, done.stderr[-3000:]
            runs[key] = path
        return runs[key]

    return run


def _resume_matches(overrides: list[str], run: Path, straight: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "alignclip.train", *overrides], env=child_env(), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    assert trainer_state(run)["step"] == STEPS
    assert max_weight_difference(final_weights(run), final_weights(straight)) <= 1e-6


@pytest.mark.heavy
def test_every_shard_gone_mid_run_saves_the_last_step_exits_124_and_resumes_exactly(toy_data, uninterrupted,
                                                                                     tmp_path):
    data = {"train": str(tmp_path / "train") + "/", "val": toy_data["val"]}
    shutil.copytree(toy_data["train"], data["train"])
    run = tmp_path / "run"
    # in shard order (no shuffle buffer to drain early when the pass loses its last shards), every step the
    # failing session completes is one of the uninterrupted run's: the comparison below is exact
    overrides = _overrides(data, run, **{"data.shuffle_buffer": 0})
    proc = _start(overrides)
    _wait_for_step(proc, run, 2)
    shutil.rmtree(data["train"])  # the storage is gone: every reader runs out of shards
    output = _finish(proc)
    _assert_saved_and_requeued(proc, output, run, "found no usable sample")
    shutil.copytree(toy_data["train"], data["train"])  # the storage is back: the requeued job resumes
    _resume_matches(overrides, run, uninterrupted(**{"data.shuffle_buffer": 0}))


@pytest.mark.heavy
def test_a_sigkilled_loader_worker_saves_the_last_step_exits_124_and_resumes_exactly(toy_data, uninterrupted,
                                                                                     tmp_path):
    run = tmp_path / "run"
    overrides = _overrides(toy_data, run, **{"data.workers": 2})
    proc = _start(overrides)
    _wait_for_step(proc, run, 1)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert children, "the trainer has no loader workers"
    # Every worker, as the OOM killer would. One worker alone may already have produced its whole share of the
    # epoch (2 workers x 2 prefetched batches of 8 per epoch), and a dead worker that owes nothing is never
    # noticed (nor does it lose a sample). At step 1 at most 2 + 4 of the 8 batches have been asked for.
    for child in children:
        os.kill(int(child), signal.SIGKILL)
    output = _finish(proc)
    # The trainer may notice at its very next batch (saving step 1) or after the batches already handed over.
    _assert_saved_and_requeued(proc, output, run, "exited unexpectedly|killed by signal|worker died", first=1)
    _resume_matches(overrides, run, uninterrupted(**{"data.workers": 2}))


def _stalled_batches(self):
    time.sleep(3600)  # a worker that never delivers (a hung read): bounded by data.loader_timeout_s
    yield {}


def test_a_loader_timeout_is_a_data_source_failure(toy_data, tmp_path, monkeypatch):
    import alignclip.data.pipeline as pipeline
    from alignclip.config import load_config

    config = load_config(None, tiny_overrides(toy_data, tmp_path / "run", **{"data.workers": 1,
                                                                              "data.loader_timeout_s": 1}))
    monkeypatch.setattr(pipeline.ShardBatches, "__iter__", _stalled_batches)  # the forked worker inherits it
    with pytest.raises(pipeline.DataSourceError) as err:
        next(iter(pipeline.build_train_loader(config, 0, 1, 0)))
    assert err.value.cause == "data: DataLoader timed out after 1.0 seconds"


def test_an_outage_across_the_end_of_a_pass_fails_the_source_instead_of_skipping_every_shard(tmp_path):
    """The shard server answers 503 to the next 8 shard requests (two passes' worth of 4 shards), from the first
    batch on, mid-pass. Every shard failing one after another is the source failing: DataSourceError (the trainer
    saves and exits 124; the requeued run reads the same data). Before, only a whole pass without a sample counted:
    the outage's tail of pass 0 and all of pass 1 were skipped, and a third pass, the server back, filled the
    epoch with other data (found by the chaos harness: a finished run with other weights)."""
    from alignclip.config import load_config
    from alignclip.data import pipeline

    write_toy_shards(tmp_path / "www" / "shards", num_shards=4, per_shard=8)
    with serve(tmp_path / "www") as (base, server):
        data = {"train": f"{base}/shards/{{00000..00003}}.tar", "val": f"{base}/shards/00003.tar"}
        config = load_config(None, tiny_overrides(data, tmp_path / "run", **{
            "data.io_retries": 0, "data.io_timeout_s": 5, "train.global_batch_size": 8, "data.samples_per_epoch": 32}))
        batches = iter(pipeline.build_train_loader(config, 0, 1, 0))
        assert len(next(batches)["key"]) == 8
        server.fail_next.value = 8
        with pytest.raises(pipeline.DataSourceError, match="found no usable sample in any of the 4 shards"):
            for _ in range(3):
                next(batches)
        assert server.fail_next.value > 0, "the source was back before the reader gave up"


# ------------------------------------------------------------------------------------------- two ranks
def _rank_run(rank: int, world_size: int, overrides: list[str], failing_rank: int, fail_after: int):
    """A trainer on this rank; on ``failing_rank`` the reader runs dry after ``fail_after`` samples."""
    from alignclip.config import load_config
    from alignclip.data import pipeline
    from alignclip.training.trainer import Trainer

    if rank == failing_rank:
        samples = pipeline.ShardReader.samples

        def failing(self):
            for i, sample in enumerate(samples(self)):
                if i == fail_after:
                    raise pipeline.DataSourceError(f"data: rank {rank} reader found no usable sample (injected)")
                yield sample

        pipeline.ShardReader.samples = failing
    result = Trainer(load_config(None, overrides)).train()
    return result.exit_code, result.step


@pytest.mark.heavy
def test_two_ranks_one_reader_dies_every_rank_saves_and_exits_124_then_resumes_exactly(toy_data, tmp_path):
    from tests.helpers.ranks import run_on_ranks

    steps = 8
    extra = {"train.max_steps": steps, "train.global_batch_size": 16, "train.collective_timeout_s": 60}
    straight = tmp_path / "straight"
    assert run_on_ranks(_rank_run, 2, _overrides(toy_data, straight, **extra), -1, 0) == [(0, steps)] * 2
    run = tmp_path / "run"
    overrides = _overrides(toy_data, run, **extra)
    # rank 1's reader fails after 40 samples: its batches of 8 end during step 5 (the shuffle buffer reads ahead)
    stopped = run_on_ranks(_rank_run, 2, overrides, 1, 40)
    assert [code for code, _ in stopped] == [124, 124] and stopped[0][1] == stopped[1][1] < steps, stopped
    assert trainer_state(run)["step"] == stopped[0][1]
    log = (run / "train.log").read_text()
    assert "data source failed on another rank: saved" in log, log[-2000:]  # rank 0 logs; rank 1 failed
    assert run_on_ranks(_rank_run, 2, overrides, -1, 0) == [(0, steps)] * 2
    assert max_weight_difference(final_weights(run), final_weights(straight)) <= 1e-6


@pytest.mark.heavy
def test_a_lost_peer_ends_the_surviving_rank_with_124_at_once(toy_data, tmp_path):
    """Rank 1 SIGKILLed mid-run (its node died): rank 0's next collective fails (gloo: "Connection closed by peer";
    a silent peer: ``train.collective_timeout_s``); one line, exit 124, nothing saved (a save is collective), the
    last checkpoint kept for the requeued job."""
    from tests.helpers.processes import launch, wait_all

    run = tmp_path / "run"
    run.mkdir()
    procs = launch(_overrides(toy_data, run, **{"train.collective_timeout_s": 60, "checkpoint.every_steps": 2}),
                   world_size=2, log_dir=tmp_path)
    try:
        log, deadline = run / "train.log", time.monotonic() + TIMEOUT_S
        while not (log.exists() and re.search(r"INFO step 3 ", log.read_text())):
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline
            time.sleep(0.005)
        procs[1].kill()
        codes = wait_all(procs, timeout=TIMEOUT_S)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes[0] == 124, (tmp_path / "rank0.out").read_text()[-3000:]
    text = log.read_text()
    assert re.search(r"lost a peer rank \(.*\): nothing saved .* the last checkpoint is \S+step_0000000\d", text), \
        text[-2000:]
    assert "Traceback" not in (tmp_path / "rank0.out").read_text()
