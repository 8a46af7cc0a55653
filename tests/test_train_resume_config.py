"""Resuming with a changed optimizer config, with the real DeepSpeed engine (tiny CLIP, CPU, one rank).

``optim.text_lr_scale`` across 1 changes the optimizer's group layout: the resume stops with a config error naming
the key (exit 2 from the command), the checkpoint is left as it was and is not called unusable, and resuming with
the saved value works. Another value on the same side (0.1 -> 0.2), or another weight decay, takes effect after the
load, which restores the saved group values. A checkpoint whose trainer state predates the recorded scale resumes
by its run's config.yaml. Exact resume with an unchanged config is tested in test_train_distributed.py and
test_faults_checkpoint.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from alignclip import checkpoints
from alignclip.training import checkpoint as ckpt
from tests.helpers import REPO_ROOT
from tests.helpers.ranks import run_on_ranks
from tests.helpers.tiny import tiny_overrides, write_toy_shards

pytestmark = pytest.mark.heavy


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("data")
    return {"train": write_toy_shards(root / "train", num_shards=1, per_shard=32),
            "val": write_toy_shards(root / "val", num_shards=1, per_shard=16, seed=1)}


def _overrides(data: dict, run: Path, zero: int, scale: float, steps: int, **extra) -> list[str]:
    return tiny_overrides(data, run, **{"train.max_steps": steps, "optim.warmup_steps": 0,
                                        "deepspeed.zero_stage": zero, "optim.text_lr_scale": scale, **extra})


def _session(rank: int, world_size: int, overrides: list[str], train: bool):
    """A trainer over the run directory (resuming its checkpoint): its optimizer groups as loaded, then, with
    ``train``, after the session's steps; or the config error it stopped with."""
    from alignclip.config import ConfigError, load_config
    from alignclip.training.trainer import Trainer

    try:
        trainer = Trainer(load_config(None, overrides))
    except ConfigError as err:
        return {"error": err}
    optimizer = trainer.engine.optimizer
    out = {"step": trainer.state.step,
           "loaded": {g["name"]: (g["lr_scale"], g["weight_decay"]) for g in optimizer.param_groups},
           # AdamW's per-parameter step counts: the checkpoint's moments were loaded, not a fresh optimizer's
           "adam_steps": sorted({float(s["step"]) for s in optimizer.state.values() if "step" in s})}
    if train:
        trainer.train()
        out["lr"] = {g["name"]: g["lr"] for g in optimizer.param_groups}
    else:
        trainer.close()
    return out


def _resume_loop(rank: int, world_size: int, overrides: list[str]):
    """``checkpoint.resume`` itself, past the trainer's early check: what it raises and what it warned."""
    from alignclip.config import load_config
    from alignclip.distributed.env import setup_distributed_env
    from alignclip.training.components import build_components
    from alignclip.training.plan import plan_step

    config = load_config(None, overrides)
    engine = build_components(plan_step(config, setup_distributed_env())).engine
    warnings: list[str] = []
    try:
        ckpt.resume(engine, config.run_dir, 1, warn=warnings.append, text_lr_scale=config.optim.text_lr_scale)
    except Exception as err:  # the test checks the type
        return type(err).__name__, str(err), warnings
    return None, "", warnings


@pytest.fixture(scope="module")
def saved_run(toy_data, tmp_path_factory):
    """``saved_run(zero, scale)``: a run directory of one step (checkpoint step_00000001) at that ZeRO stage and
    text_lr_scale, trained once per module; the tests resume copies of it."""
    saved: dict[tuple[int, float], Path] = {}

    def make(zero: int, scale: float) -> Path:
        if (zero, scale) not in saved:
            run = tmp_path_factory.mktemp(f"zero{zero}_scale{scale}") / "run"
            done, = run_on_ranks(_session, 1, _overrides(toy_data, run, zero, scale, steps=1), True)
            assert "error" not in done, done
            saved[zero, scale] = run
        return saved[zero, scale]

    return make


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.parts[len(run.parts)] in ("checkpoints", "config.yaml")}


def test_a_text_lr_scale_of_1_resumed_below_1_names_the_key_and_keeps_the_checkpoint(toy_data, saved_run, tmp_path):
    run = _copy(saved_run(1, 1.0), tmp_path)
    before = _snapshot(run)
    changed = _overrides(toy_data, run, 1, 0.1, steps=2)
    outcome, = run_on_ranks(_session, 1, changed, False)
    err = outcome["error"]
    assert isinstance(err, ckpt.ConfigChangeError) and not isinstance(err, checkpoints.CheckpointError)
    message = str(err)
    assert message.startswith("key 'optim.text_lr_scale' is 0.1 but checkpoint "), message
    assert "step_00000001 was written with 1:" in message and "The checkpoint is fine" in message
    assert "resume with optim.text_lr_scale=1," in message and "new run directory" in message
    # the resume loop itself (past the trainer's early check) raises at once, without calling the checkpoint unusable
    kind, message, warnings = run_on_ranks(_resume_loop, 1, changed)[0]
    assert kind == "ConfigChangeError" and "key 'optim.text_lr_scale' is 0.1" in message and not warnings
    assert _snapshot(run) == before  # checkpoint, latest and config.yaml as they were
    assert checkpoints.verify_manifest(run / "checkpoints" / "step_00000001") is None
    # the advice works: the saved value resumes
    resumed, = run_on_ranks(_session, 1, _overrides(toy_data, run, 1, 1.0, steps=2), False)
    assert resumed["step"] == 1 and resumed["adam_steps"] == [1.0]


def test_a_text_lr_scale_below_1_resumed_at_1_exits_2_naming_the_key(toy_data, saved_run, tmp_path):
    run = _copy(saved_run(1, 0.1), tmp_path)
    before = _snapshot(run)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    done = subprocess.run([sys.executable, "-m", "alignclip.train", *_overrides(toy_data, run, 1, 1.0, steps=2)],
                          env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "config error: key 'optim.text_lr_scale' is 1 but checkpoint " in done.stderr, done.stderr[-3000:]
    assert "written with 0.1:" in done.stderr
    assert "resume with optim.text_lr_scale=0.1 (or any other value below 1)" in done.stderr
    assert "unusable" not in done.stderr and "Traceback" not in done.stderr
    assert _snapshot(run) == before


@pytest.mark.parametrize("zero", [1, 2])
def test_another_text_lr_scale_below_1_and_another_weight_decay_take_effect_on_resume(toy_data, saved_run,
                                                                                        tmp_path, zero):
    """Before the fix the groups kept the checkpoint's 0.1 (torch's load_state_dict restores a group's values)."""
    run = _copy(saved_run(zero, 0.1), tmp_path)
    changed = _overrides(toy_data, run, zero, 0.2, steps=2, **{"optim.weight_decay": 0.05})
    out, = run_on_ranks(_session, 1, changed, True)
    assert out["step"] == 1 and out["adam_steps"] == [1.0]
    assert out["loaded"] == {"decay": (1.0, 0.05), "no_decay": (1.0, 0.0), "decay_text": (0.2, 0.05),
                             "no_decay_text": (0.2, 0.0)}  # (lr_scale, weight_decay): the config's values
    lr = out["lr"]  # the resumed step's: the text groups at 0.2 of the image side's
    assert lr["decay_text"] == pytest.approx(0.2 * lr["decay"])
    assert lr["no_decay_text"] == pytest.approx(0.2 * lr["no_decay"])
    state = json.loads((run / "checkpoints" / "step_00000002" / checkpoints.STATE_FILE).read_text())
    assert state["text_lr_scale"] == 0.2  # the next resume compares against the value trained with now


def test_a_checkpoint_from_before_the_recorded_scale_resumes_by_its_config(toy_data, saved_run, tmp_path):
    """trainer_state.json without ``text_lr_scale`` (as written before it was recorded; the manifest rewritten to
    match): the run's config.yaml (0.1) says its layout. The same value resumes unchanged, 1 names the key."""
    run = _copy(saved_run(1, 0.1), tmp_path)
    newest = run / "checkpoints" / "step_00000001"
    state = json.loads((newest / checkpoints.STATE_FILE).read_text())
    assert state.pop("text_lr_scale") == 0.1
    (newest / checkpoints.STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    manifest = json.loads((newest / checkpoints.MANIFEST).read_text())
    manifest["files"][checkpoints.STATE_FILE] = {"size": (newest / checkpoints.STATE_FILE).stat().st_size,
                                          "sha256": checkpoints.file_digest(newest / checkpoints.STATE_FILE)}
    (newest / checkpoints.MANIFEST).write_text(json.dumps(manifest))
    outcome, = run_on_ranks(_session, 1, _overrides(toy_data, run, 1, 1.0, steps=2), False)
    assert isinstance(outcome.get("error"), ckpt.ConfigChangeError) and "written with 0.1:" in str(outcome["error"])
    same, = run_on_ranks(_session, 1, _overrides(toy_data, run, 1, 0.1, steps=2), False)
    assert same["step"] == 1 and same["adam_steps"] == [1.0]
    assert same["loaded"] == {"decay": (1.0, 0.1), "no_decay": (1.0, 0.0), "decay_text": (0.1, 0.1),
                              "no_decay_text": (0.1, 0.0)}
