"""A run folder that cannot be written -- read-only, or full -- stops the trainer with one line naming the path and
exit 2 (no traceback), the line also in train.log when it can still take it. Real trainer, real file systems
(tmpfs mounts: root only)."""

from __future__ import annotations

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
