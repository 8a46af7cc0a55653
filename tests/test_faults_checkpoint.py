"""Fault injection on checkpoints: changed bytes, truncated or empty files, a broken trainer state, a lost
manifest, a planted pickle payload, a full disk. Each must be detected at resume, named (file and checkpoint), and
answered by the newest checkpoint that verifies, or by exit 2 when none does; a full disk must say so, at its path.

The heavy cases train a tiny AlignCLIP (the launch tests' toy run) once to 6 steps with checkpoints at 2, 4, 6, then
damage a copy of that run directory and resume it with the real trainer.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from alignclip import checkpoints
from alignclip.training import checkpoint as ckpt
from tests.helpers import REPO_ROOT
from tests.helpers.launch import final_weights, job_env, job_overrides, max_weight_difference
from tests.helpers.tmpfs import tmpfs

STEPS = 6


def _train(run_dir: Path, cache: Path, timeout: float = 300, **extra) -> subprocess.CompletedProcess:
    overrides = job_overrides(cache, run_dir, **{"train.max_steps": STEPS, "checkpoint.every_steps": 2,
                                                  "checkpoint.keep": 3, "loss.imsep_weight": 0.0, **extra})
    env = {**os.environ, **job_env()}
    return subprocess.run([sys.executable, "-m", "alignclip.train", *overrides], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("faults")
    done = _train(root / "base", root / "data")
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "base", root / "data"


def _copy(base_run, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(base_run[0], run)
    return run


def _step(run: Path, step: int) -> Path:
    return run / "checkpoints" / checkpoints.step_name(step)


def _overwrite_bytes(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        f.write(b"\xde\xad\xbe\xef")


class Payload:
    """Unpickling this runs ``touch MARKER`` (what a planted pickle could do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


FAULTS = {
    "bytes overwritten in the optimizer partition":
        lambda c: _overwrite_bytes(c / "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
    "truncated model file": lambda c: os.truncate(c / "mp_rank_00_model_states.pt", 1000),
    "empty RNG file": lambda c: (c / "rng_state_rank0.pt").write_bytes(b""),
    "broken trainer_state.json": lambda c: (c / "trainer_state.json").write_text('{"step": 6,'),
    "manifest deleted": lambda c: (c / "manifest.json").unlink(),
}
NAMED = {"bytes overwritten in the optimizer partition": "zero_pp_rank_0_mp_rank_00_optim_states.pt",
         "truncated model file": "mp_rank_00_model_states.pt", "empty RNG file": "rng_state_rank0.pt",
         "broken trainer_state.json": "trainer_state.json", "manifest deleted": "manifest.json"}


@pytest.mark.heavy
@pytest.mark.parametrize("fault", list(FAULTS))
def test_damaged_newest_checkpoint_is_named_and_the_previous_one_resumes_exactly(base_run, tmp_path, fault):
    run = _copy(base_run, tmp_path)
    FAULTS[fault](_step(run, 6))
    (run / "checkpoints" / "step_00000007.tmp").mkdir()  # a partial save of a crashed run
    done = _train(run, base_run[1])
    assert done.returncode == 0, done.stderr[-3000:]
    warning = [line for line in done.stderr.splitlines() if "is unusable" in line]
    assert warning and str(_step(run, 6) / NAMED[fault]) in warning[0], done.stderr[-3000:]
    assert f"resuming from {_step(run, 4)}, an OLDER checkpoint" in done.stderr
    assert f"resumed from {_step(run, 4)} at step 4" in (run / "train.log").read_text()
    assert not (run / "checkpoints" / "step_00000007.tmp").exists()  # stale .tmp removed at start
    # steps 5 and 6 trained again from step 4 end where the undamaged run ended
    assert max_weight_difference(final_weights(run), final_weights(base_run[0])) <= 1e-6


@pytest.mark.heavy
def test_planted_pickle_in_the_rng_file_does_not_run_and_the_checkpoint_is_refused(base_run, tmp_path):
    """Even with the manifest rewritten to match (an attacker who can write the run directory), the RNG file is
    loaded with weights_only=True: the payload fails to load, the checkpoint is refused, the older one resumes."""
    run = _copy(base_run, tmp_path)
    newest, marker = _step(run, 6), tmp_path / "payload_ran"
    torch.save({"torch": Payload(marker)}, newest / "rng_state_rank0.pt")
    manifest = json.loads((newest / "manifest.json").read_text())
    manifest["files"]["rng_state_rank0.pt"] = {"size": (newest / "rng_state_rank0.pt").stat().st_size,
                                               "sha256": checkpoints.file_digest(newest / "rng_state_rank0.pt")}
    (newest / "manifest.json").write_text(json.dumps(manifest))
    done = _train(run, base_run[1])
    assert done.returncode == 0, done.stderr[-3000:]
    assert not marker.exists(), "the planted payload ran"
    assert f"{newest}: loading failed on rank 0: UnpicklingError" in done.stderr, done.stderr[-3000:]
    assert f"resumed from {_step(run, 4)} at step 4" in (run / "train.log").read_text()


@pytest.mark.heavy
def test_no_checkpoint_that_verifies_stops_with_exit_2_naming_each(base_run, tmp_path):
    run = _copy(base_run, tmp_path)
    for step in (2, 4, 6):
        _overwrite_bytes(_step(run, step) / "mp_rank_00_model_states.pt")
    done = _train(run, base_run[1])
    assert done.returncode == 2, done.stderr[-3000:]
    assert "no checkpoint in" in done.stderr and "verifies or loads (3 tried)" in done.stderr
    for step in (2, 4, 6):
        assert f"{_step(run, step) / 'mp_rank_00_model_states.pt'}: SHA-256 differs" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 1 MiB tmpfs (root only), unmounted in teardown."""
    with tmpfs(tmp_path / "full", "1m") as mount:
        yield mount


@pytest.mark.heavy
def test_full_disk_names_the_path_says_no_space_and_leaves_no_partial_checkpoint(base_run, tmp_path, tiny_tmpfs):
    """The checkpoints folder is a 1 MiB file system: the first save (a 6 MB model file) fills it."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").symlink_to(tiny_tmpfs)
    done = _train(run, base_run[1])
    assert done.returncode == 2  # one line, exit 2 (tests/test_faults_run_folder.py)
    tmp = run / "checkpoints" / "step_00000002.tmp"
    assert f"writing checkpoint {tmp} failed: no space left on device" in done.stderr, done.stderr[-3000:]
    assert not tmp.exists() and not list(tiny_tmpfs.glob("*.tmp"))  # the partial save is gone: space freed


# ------------------------------------------------------------------------------------ without a trainer
def test_manifest_names_changed_missing_extra_and_resized_files(tmp_path):
    folder = tmp_path / "step_00000001"
    folder.mkdir()
    (folder / "a.pt").write_bytes(os.urandom(3 * 1024))
    (folder / "b.json").write_text("{}")
    checkpoints.write_manifest(folder)
    assert checkpoints.verify_manifest(folder) is None
    _overwrite_bytes(folder / "a.pt")
    assert checkpoints.verify_manifest(folder) == f"{folder / 'a.pt'}: SHA-256 differs from the manifest (the bytes " \
                                           "changed after the save)"
    (folder / "a.pt").write_bytes(b"x")
    assert checkpoints.verify_manifest(folder) == f"{folder / 'a.pt'}: 1 bytes, the manifest says 3072"
    (folder / "a.pt").unlink()
    assert checkpoints.verify_manifest(folder) == f"{folder / 'a.pt'}: listed in the manifest but missing"
    checkpoints.write_manifest(folder)
    (folder / "extra.bin").write_bytes(b"1")
    assert checkpoints.verify_manifest(folder) == f"{folder / 'extra.bin'}: not listed in the manifest"
    (folder / "manifest.json").write_text("{")
    assert "unreadable manifest" in checkpoints.verify_manifest(folder)


def test_file_digest_streams_and_equals_hashlib(tmp_path):
    import hashlib

    data = os.urandom((8 << 20) + 12345)  # more than one chunk
    (tmp_path / "f").write_bytes(data)
    assert checkpoints.file_digest(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_rng_states_round_trip_through_weights_only_load(tmp_path):
    torch.manual_seed(3), np.random.seed(4)
    import random

    random.seed(5)
    np.random.standard_normal()  # a cached gaussian in numpy's state
    torch.save(ckpt.capture_rng(), tmp_path / checkpoints.RNG_FILE.format(rank=0))
    expected = (torch.rand(3), np.random.rand(3), random.random(), np.random.standard_normal())
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    ckpt.restore_rng(ckpt.load_rng(tmp_path, 0))
    again = (torch.rand(3), np.random.rand(3), random.random(), np.random.standard_normal())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2:] == again[2:]


def test_planted_payload_in_the_rng_file_fails_to_load_without_running(tmp_path):
    marker = tmp_path / "payload_ran"
    torch.save({"torch": Payload(marker)}, tmp_path / checkpoints.RNG_FILE.format(rank=0))
    with pytest.raises(pickle.UnpicklingError):
        ckpt.load_rng(tmp_path, 0)
    assert not marker.exists()


def test_an_old_checkpoint_without_manifest_still_loads_its_pickled_rng(tmp_path):
    """Checkpoints written before manifests: numpy's tuple and python's tuple, pickled as rng_rank<R>.pt."""
    import random

    old = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    torch.save(old, tmp_path / checkpoints.LEGACY_RNG.format(rank=0))
    expected = np.random.rand(2)
    np.random.seed(1)
    assert checkpoints.verify_manifest(tmp_path) is None
    ckpt.restore_rng(ckpt.load_rng(tmp_path, 0))
    assert np.array_equal(np.random.rand(2), expected)
    # the legacy (unpickling) path is closed to checkpoints that have a manifest
    checkpoints.write_manifest(tmp_path)
    assert ckpt.load_rng(tmp_path, 0) is None


def test_write_error_message_names_the_path_and_a_full_disk(tmp_path):
    import errno

    full = OSError(errno.ENOSPC, "No space left on device")
    message = ckpt.describe_write_error(full, tmp_path / "step_00000002.tmp")
    assert message.startswith(f"writing checkpoint {tmp_path / 'step_00000002.tmp'} failed: no space left on device")
    other = ckpt.describe_write_error(PermissionError(13, "Permission denied"), tmp_path / "x.tmp")
    assert "no space" not in other and "PermissionError" in other
