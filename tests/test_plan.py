"""The run plan (alignclip.training.plan): resolved once, before anything is built; resume changes made explicit.

Each resume incompatibility exits 2 before any model or loader is built, naming the key with its old and new values
(one test per key kind: model shape, arch, global batch, micro batch, seed, data spec, loss recipe);
``train.resume_changes=carry`` carries the position in samples seen, exactly. The checkpoints here are the files
the plan reads (trainer state and config); the end-to-end tests train a tiny run and resume it through the CLI.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from alignclip import checkpoints
from alignclip.config import ConfigError, load_config, to_yaml
from alignclip.distributed.env import detect
from alignclip.training import checkpoint as ckpt
from alignclip.training.plan import (carried_position, config_changes, encoder_width, kind_of, plan_resume,
                                     resolve_plan)
from tests.helpers import REPO_ROOT
from tests.helpers.processes import child_env
from tests.helpers.tiny import tiny_overrides

SINGLE = detect({})


def _saved_run(tmp_path: Path, overrides: list[str], step: int = 2, batch_in_epoch: int = 2,
               accumulation: int = 1) -> Path:
    """A run directory whose newest checkpoint holds a trainer state and the config it trained with."""
    run = tmp_path / "run"
    folder = checkpoints.checkpoints_dir(run) / checkpoints.step_name(step)
    folder.mkdir(parents=True)
    config = load_config(None, overrides)
    state = checkpoints.TrainerState(step=step, samples_seen=step * config.train.global_batch_size,
                              batch_in_epoch=batch_in_epoch, accumulation=accumulation,
                              text_lr_scale=config.optim.text_lr_scale)
    (folder / checkpoints.STATE_FILE).write_text(json.dumps(asdict(state)))
    (folder / "config.yaml").write_text(to_yaml(config))
    (folder.parent / checkpoints.LATEST).write_text(folder.name + "\n")
    return run


BASE = tiny_overrides("/nonexistent-data", "/nonexistent-run")


@pytest.mark.parametrize("key, new", [
    ("model.embed_dim", 64),  # model shape
    ("model.arch", "sharedclip"),
    ("model.vision.layers", 2),
])
def test_a_changed_model_is_refused_naming_the_key_old_and_new_and_calls_no_checkpoint_unusable(tmp_path, key,
                                                                                                 new):
    run = _saved_run(tmp_path, BASE)
    config = load_config(None, [*BASE, f"run_dir={run}", f"{key}={new}", "train.resume_changes=carry"])
    with pytest.raises(ckpt.ConfigChangeError) as err:
        plan_resume(config, run, 1)
    message = str(err.value)
    old = load_config(None, BASE)
    assert f"{key}: " in message and repr(new) in message, message
    assert "unusable" not in message and "intact" in message
    assert repr(eval(f"old.{key}")) in message  # noqa: S307 (the old value, read from the schema)


@pytest.mark.parametrize("key, new", [
    ("train.global_batch_size", 32),
    ("train.micro_batch_size", 8),
    ("train.seed", 7),
    ("data.train", "/other/shards/"),
    ("loss.crsep_weight", 1.0),  # the loss recipe
    ("loss.imsep_weight", 0.5),
])
def test_a_data_order_or_recipe_change_is_refused_naming_the_key_old_and_new(tmp_path, key, new):
    run = _saved_run(tmp_path, BASE)
    config = load_config(None, [*BASE, f"run_dir={run}", f"{key}={new}"])
    old = load_config(None, BASE)
    with pytest.raises(ckpt.ConfigChangeError) as err:
        resolve_plan(config, SINGLE)  # the first thing the plan checks: nothing is read beyond the run directory
    message = str(err.value)
    assert f"{key}: {eval(f'old.{key}')!r} -> {new!r}" in message, message  # noqa: S307
    assert "train.resume_changes=carry" in message


def test_every_refused_key_is_named_at_once(tmp_path):
    run = _saved_run(tmp_path, BASE)
    config = load_config(None, [*BASE, f"run_dir={run}", "train.seed=3", "train.global_batch_size=32"])
    with pytest.raises(ConfigError, match=r"train.global_batch_size: 16 -> 32; train.seed: 0 -> 3"):
        plan_resume(config, run, 1)


def test_free_keys_pass_and_are_listed(tmp_path):
    run = _saved_run(tmp_path, BASE)
    config = load_config(None, [*BASE, f"run_dir={run}", "optim.lr=0.01", "logging.log_every_steps=5",
                                "loss.impl=chunked", "model.grad_checkpointing=true"])
    _, resume = plan_resume(config, run, 1)
    assert {c.key for c in resume.changes} == {"optim.lr", "logging.log_every_steps", "loss.impl",
                                               "model.grad_checkpointing"}
    assert {c.kind for c in resume.changes} == {"free"} and not resume.carry


def test_change_kinds():
    assert kind_of("model.text.width") == "model" and kind_of("model.pooled_last_block") == "free"
    assert kind_of("loss.imsep_sides") == "data order" and kind_of("loss.chunk_size") == "free"
    assert kind_of("data.workers") == "data order" and kind_of("data.prefetch_factor") == "free"
    changes = config_changes(load_config(None, BASE), load_config(None, [*BASE, "launch.nodes=4", "name=x"]))
    assert changes == []  # where a run goes is not what it trains


def _plan_for(steps_per_epoch: int, overrides: list[str]):
    from alignclip.distributed.layout import batch_layout

    class Plan:  # the two fields carried_position reads
        pass

    plan = Plan()
    plan.layout = batch_layout(load_config(None, overrides), 1)
    plan.steps_per_epoch = steps_per_epoch
    return plan


def test_carry_keeps_the_samples_seen_in_the_epoch_exactly():
    # 3 steps of 16 into the epoch = 48 samples = 6 steps of 8, or 3 steps of 4 x 4 accumulated micro-batches
    state = checkpoints.TrainerState(step=3, samples_seen=48, epoch=1, batch_in_epoch=3, accumulation=1)
    smaller = carried_position(state, 16, _plan_for(8, [*BASE, "train.global_batch_size=8"]))
    assert (smaller.epoch, smaller.batch_in_epoch, smaller.samples_seen) == (1, 6, 48)
    accumulated = carried_position(state, 16, _plan_for(4, [*BASE, "train.micro_batch_size=4"]))
    assert (accumulated.batch_in_epoch, accumulated.accumulation) == (12, 4)
    with pytest.raises(ckpt.ConfigChangeError, match=r"48 samples .* not a multiple of .* \(32\)"):
        carried_position(state, 16, _plan_for(2, [*BASE, "train.global_batch_size=32"]))
    past = carried_position(state, 16, _plan_for(1, [*BASE, "train.global_batch_size=48"]))
    assert (past.epoch, past.batch_in_epoch) == (2, 0)  # the new epoch is shorter: it is over


def test_the_caption_encoder_width_is_read_from_its_files_not_its_name():
    assert encoder_width("minilm-offline") == 384  # flops.semantic_dim_of's name table said 768 for this alias
    assert encoder_width("/no/such/encoder") == 0


# ------------------------------------------------------------------------------------------ end to end
def _train(overrides: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "alignclip.train", *overrides], env=child_env(), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.heavy
def test_a_tiny_run_writes_its_plan_and_configs_and_a_refused_resume_builds_nothing(tmp_path):
    run = tmp_path / "run"
    first = _train(tiny_overrides(tmp_path / "data", run, **{"train.max_steps": 3}))
    assert first.returncode == 0, first.stderr[-3000:]
    plan = (run / "plan.yaml").read_text()
    for line in ("global: 16", "accumulation: 1", "pin_memory: false", "samples_per_epoch: 64",
                 "total_steps: 3", "source: none"):
        assert line in plan, plan
    assert len(list((run / "configs").glob("config-*.yaml"))) == 1
    assert (run / "checkpoints" / "step_00000003" / "config.yaml").is_file()

    before = sorted(p.name for p in run.rglob("*"))
    refused = _train(tiny_overrides(tmp_path / "data", run, **{"train.max_steps": 6,
                                                                "train.global_batch_size": 32}))
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "train.global_batch_size: 16 -> 32" in refused.stderr and "Traceback" not in refused.stderr
    assert len(refused.stderr.strip().splitlines()[-1]) > 0
    assert sorted(p.name for p in run.rglob("*")) == before  # nothing written: not even a config in the history

    carried = _train(tiny_overrides(tmp_path / "data", run, **{"train.max_steps": 5, "train.global_batch_size": 8,
                                                                "train.resume_changes": "carry"}))
    assert carried.returncode == 0, carried.stderr[-3000:]
    state = json.loads((run / "checkpoints" / "step_00000005" / checkpoints.STATE_FILE).read_text())
    # 3 steps x 16 = 48 samples = 6 steps of 8 into the epoch; then 2 more steps of 8
    assert (state["samples_seen"], state["batch_in_epoch"], state["epoch"]) == (64, 8, 0)
    log = (run / "train.log").read_text()
    assert "config changed since the checkpoint: train.global_batch_size: 16 -> 8 (carried" in log
    assert len(list((run / "configs").glob("config-*.yaml"))) == 2
