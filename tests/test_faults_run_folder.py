"""A run folder that cannot be written -- read-only, or full -- stops the trainer with one line naming the path and
exit 2 (no traceback), the line also in train.log when it can still take it. Real trainer, real file systems
(tmpfs mounts: root only)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT
from tests.helpers.processes import child_env
from tests.helpers.tmpfs import tmpfs
from tests.helpers.tiny import tiny_overrides

pytestmark = pytest.mark.heavy


def _train(run: Path, data: Path, **extra) -> subprocess.CompletedProcess:
    overrides = tiny_overrides(data, run, **{"train.max_steps": 2, "checkpoint.every_steps": 2, **extra})
    return subprocess.run([sys.executable, "-m", "alignclip.train", *overrides], env=child_env(), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600)


def test_a_read_only_run_folder_is_one_line_and_exit_2(tmp_path):
    with tmpfs(tmp_path / "mnt", "64m") as mount:
        run = mount / "run"
        assert _train(run, tmp_path / "data").returncode == 0
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True, timeout=30)
        done = _train(run, tmp_path / "data", **{"train.max_steps": 4})
        assert done.returncode == 2, done.stderr[-3000:]  # was 1, after a 20-line traceback
        assert "Traceback" not in done.stderr, done.stderr[-3000:]
        (line,) = [x for x in done.stderr.splitlines() if x.startswith("run folder error: ")]
        assert f"{run}/" in line and "read-only file system" in line


def test_a_full_run_folder_is_one_line_exit_2_and_in_train_log(tmp_path):
    with tmpfs(tmp_path / "mnt", "2m") as mount:
        run = mount / "run"
        done = _train(run, tmp_path / "data")
        assert done.returncode == 2, done.stderr[-3000:]  # was 1, the message inside a 49-line traceback
        assert "Traceback" not in done.stderr, done.stderr[-3000:]
        tmp = run / "checkpoints" / "step_00000002.tmp"
        # the checkpoint write usually meets the full disk first; on a busy machine TensorBoard's event thread may
        # (it names no file): either way one line that says so, also in train.log
        (line,) = [x for x in done.stderr.splitlines() if x.startswith("run folder error: ")]
        events_full = (f"run folder error: no space left on device: the run folder {run.resolve()} is full (its "
                       f"logs or TensorBoard events)")
        assert line == events_full or line.startswith(f"run folder error: writing checkpoint {tmp} failed: no space "
                                                      f"left on device"), line
        assert line in (run / "train.log").read_text()  # was: not in train.log
        assert not tmp.exists()


_WRITER_ON_A_FULL_DISK = """
import subprocess, sys, threading
if sys.argv[2] == "quiet":
    from alignclip.train import quiet_unwritable_in_writer_threads
    quiet_unwritable_in_writer_threads()
from torch.utils.tensorboard import SummaryWriter
writer = SummaryWriter(sys.argv[1] + "/tb")
writer.flush()
subprocess.run(["dd", "if=/dev/zero", "of=" + sys.argv[1] + "/filler", "bs=64k"], capture_output=True)
try:
    for i in range(200):
        writer.add_scalar("loss", float(i), i)
    writer.flush()
    writer.close()
except OSError as err:
    print("the writer raised errno", err.errno)
for thread in threading.enumerate():  # the event thread ends after its error (and its traceback, if printed)
    if thread is not threading.main_thread():
        thread.join(timeout=60)
"""


@pytest.mark.parametrize("hook", ["quiet", "default"])
def test_tensorboards_event_thread_on_a_full_run_folder_prints_no_traceback(tmp_path, hook):
    """The event thread meets the full disk first (a full run folder between two checkpoints): it prints no
    traceback of its own (it used to: "Exception in thread ... OSError: [Errno 28]" above the one line); the
    writer raises the error in the writing thread, where the trainer reports it as one line. Without the hook
    (``default``), the thread's traceback is there: what the test would see before."""
    with tmpfs(tmp_path / "mnt", "1m") as mount:
        done = subprocess.run([sys.executable, "-c", _WRITER_ON_A_FULL_DISK, str(mount), hook], env=child_env(),
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert "the writer raised errno 28" in done.stdout, done.stdout + done.stderr[-3000:]
    assert ("Traceback" in done.stderr) == (hook == "default"), done.stderr[-3000:]


def test_a_train_log_line_the_full_run_folder_cannot_take_is_raised_not_printed(tmp_path, capfd):
    """train.log meets the full disk first (the disk filled between two checkpoints, TensorBoard off): the write
    error reaches the trainer, which stops with the one line (``run_folder_problem``). Before, logging printed
    "--- Logging error ---" with two tracebacks and the run trained on without its log (found by the chaos
    harness)."""
    from alignclip.config import load_config
    from alignclip.train import run_folder_problem
    from alignclip.training.monitor import Monitor

    with tmpfs(tmp_path / "mnt", "1m") as mount:
        run = mount / "run"
        run.mkdir()
        config = load_config(None, tiny_overrides(mount / "data", run, **{"logging.tensorboard": False}))
        monitor = Monitor(run, config.logging, True, 10, 0)
        monitor.scalars(1, {"loss/total": 1.0})
        subprocess.run(["dd", "if=/dev/zero", f"of={mount / 'filler'}", "bs=64k"], capture_output=True, timeout=60)
        with pytest.raises(OSError) as err:
            for step in range(2, 200):  # the handler's buffer takes a few lines before a write reaches the disk
                monitor.scalars(step, {"loss/total": 1.0, "note": float(step)})
        with contextlib.suppress(OSError):  # closing flushes the line that could not be written: the same error
            monitor.close()
        assert run_folder_problem(err.value, config) == (f"no space left on device: the run folder {run.resolve()} is "
                                                         f"full (its logs or TensorBoard events)")
        assert "Logging error" not in capfd.readouterr().err
