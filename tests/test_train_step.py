"""The trainer's step through its public API (``Trainer``, ``build_components``): host syncs per step, skipped
optimizer steps (DeepSpeed's overflow check) under the ``train.nonfinite`` policy, a real overflowing run, and a
failed resume that leaves the run's config alone."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from tests.helpers import REPO_ROOT
from tests.helpers.old_configs import to_old_layout
from tests.helpers.ranks import run_on_ranks
from tests.helpers.tiny import scalar_events, tiny_overrides, write_toy_shards

TINY = ["model.arch=clip", "model.embed_dim=32", "model.vision.image_size=32", "model.vision.patch_size=8",
        "model.vision.width=32", "model.vision.layers=1", "model.vision.heads=2", "model.text.context_length=16",
        "model.text.width=32", "model.text.layers=1", "model.text.heads=2", "loss.impl=dense",
        "train.global_batch_size=8", "optim.lr=1e-3", "optim.warmup_steps=0", "fast_path.precision=fp32",
        "train.device=cpu"]


def _batch(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 49000, (8, 16), generator=gen)
    tokens[:, -1] = 49407  # end of text, where the text tower pools
    return {"image": torch.randn(8, 3, 32, 32, generator=gen), "text": tokens}


def _bare_trainer(overrides: list[str], total_steps: int = 10):
    from alignclip.config import load_config
    from alignclip.distributed.env import setup_distributed_env
    from alignclip.training.components import build_components
    from alignclip.training.plan import plan_step
    from alignclip.training.trainer import Stepper

    return Stepper(build_components(plan_step(load_config(None, [*TINY, *overrides]), setup_distributed_env())),
                   total_steps)


# ------------------------------------------------------------------------------------------------ host syncs
class _SyncCounter(torch.overrides.TorchFunctionMode):
    """Counts host reads of tensors (``item``, ``tolist``, ``float``, ``bool``, ...) and all-reduces, by whose code
    asked for them: the trainer (alignclip/training), the rest of ours (the loss's gather), DeepSpeed."""

    READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__"}

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def caller(self) -> str:
        frame = sys._getframe(2)
        while frame is not None:
            name = frame.f_code.co_filename
            if "/torch/" not in name and not name.endswith("test_train_step.py"):
                return ("trainer" if "/alignclip/training/" in name else "alignclip" if "/alignclip/" in name
                        else "deepspeed" if "/deepspeed/" in name else "other")
            frame = frame.f_back
        return "other"

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.READS:
            key = f"{self.caller()} read"
            self.counts[key] = self.counts.get(key, 0) + 1
        return func(*args, **(kwargs or {}))


def _count_syncs(rank: int, world_size: int):
    import torch.distributed as dist

    trainer = _bare_trainer([])
    counter = _SyncCounter()
    real = dist.all_reduce

    def all_reduce(*args, **kwargs):  # wraps the one collective our step and stats use
        key = f"{counter.caller()} all_reduce"
        counter.counts[key] = counter.counts.get(key, 0) + 1
        return real(*args, **kwargs)

    trainer.train_step(_batch(0))  # warm-up: lazy initialisations are not per-step costs
    dist.all_reduce = all_reduce
    try:
        with counter:
            steps = [trainer.train_step(_batch(i)) for i in range(1, 4)]
        per_step = {k: v / 3 for k, v in counter.counts.items()}
        counter.counts = {}
        with counter:
            stats = trainer.read_stats(steps)
        at_log = dict(counter.counts)
    finally:
        dist.all_reduce = real
    return per_step, at_log, [s["loss/total"] for s in stats]


@pytest.mark.heavy
def test_a_step_reads_the_device_once_per_micro_batch_and_the_log_step_once_for_the_window():
    """Per step (2 ranks, no accumulation): the trainer's one host read, of the non-finite flags after their one
    all-reduce; nothing else of ours reads the device (the loss's gather reduces its gradients in backward, which
    on NCCL is stream work, not a host wait). The stats of a whole window: one all-reduce and one read, plus the
    gradient norm."""
    results = run_on_ranks(_count_syncs, 2)
    for per_step, at_log, losses in results:
        assert per_step.get("trainer read") == 1 and per_step.get("trainer all_reduce") == 1, per_step
        assert "alignclip read" not in per_step, per_step
        assert at_log.get("trainer all_reduce") == 1 and at_log.get("trainer read", 0) <= 2, at_log
        assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert results[0][2] == results[1][2]  # the global-batch loss, the same on every rank
    print("host syncs per step:", results[0][0], "at a log step:", results[0][1])


# ---------------------------------------------------------------------------------------- text lr scale
def _first_step_updates(rank: int, world_size: int, overrides: list[str]):
    trainer = _bare_trainer(overrides)
    model = trainer.components.model
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    trainer.train_step(_batch(0))
    moved = {k: (v.detach() - before[k]).abs().max().item() for k, v in model.named_parameters()}
    return moved, [(g["name"], g["lr"]) for g in trainer.engine.optimizer.param_groups]


@pytest.mark.parametrize("zero", [1, 2])
def test_text_lr_scale_reaches_the_optimizer_through_deepspeed(zero):
    """Adam's first step moves every parameter with a gradient by about its group's lr: the text-only
    parameters by a tenth of the image side's under ZeRO's wrapped optimizer."""
    (moved, groups), = run_on_ranks(_first_step_updates, 1, [f"deepspeed.zero_stage={zero}", "optim.weight_decay=0",
                                                            "optim.text_lr_scale=0.1"])
    assert {name: lr for name, lr in groups} == pytest.approx(
        {"decay": 1e-3, "no_decay": 1e-3, "decay_text": 1e-4, "no_decay_text": 1e-4})
    assert moved["image_stem.patch_embed.weight"] == pytest.approx(1e-3, rel=0.01)
    assert moved["text_trunk.proj.weight"] == pytest.approx(1e-4, rel=0.01)
    assert moved["text_stem.token_embed.weight"] == pytest.approx(1e-4, rel=0.01)


# ------------------------------------------------------------------------------------- the IMSep onset
def _onset_stats(rank: int, world_size: int, overrides: list[str]):
    trainer = _bare_trainer(overrides)
    steps = [trainer.train_step(_batch(i)) for i in range(5)]
    resumed = _bare_trainer(overrides)
    resumed.state.step = 3  # what a resume restores: the schedule follows the step, not a count of calls
    return trainer.read_stats(steps), resumed.read_stats([resumed.train_step(_batch(3))])[0]


def test_the_trainer_gives_the_objective_its_step_for_the_imsep_onset():
    """IMSep from step 2 over 2 steps: each step's total is crsep + its weight x imsep, and the weight is
    logged as train/imsep_weight; the step comes from the trainer's state, so a resumed run continues it."""
    stats, resumed = run_on_ranks(_onset_stats, 1, ["loss.clip_weight=0", "loss.crsep_weight=1", "loss.imsep_weight=0.5",
                                           "loss.imsep_rescale=false", "loss.imsep_start_step=2",
                                           "loss.imsep_ramp_steps=2"])[0]
    assert [s["train/imsep_weight"] for s in stats] == [0.0, 0.0, 0.25, 0.5, 0.5]
    assert resumed["train/imsep_weight"] == 0.5
    for s in stats:
        assert s["loss/total"] == pytest.approx(s["loss/crsep"] + s["train/imsep_weight"] * s["loss/imsep"],
                                                rel=1e-6)
    assert stats[0]["loss/imsep"] > 0  # computed and logged before its onset too


# ------------------------------------------------------------------------------- skipped optimizer steps
def _overflowing_gradient(rank: int, world_size: int, overrides: list[str]):
    """A finite loss with an infinite gradient (a hook on one weight): DeepSpeed's overflow check must skip the
    optimizer step, and the trainer must count it under the nonfinite policy."""
    from alignclip.training.trainer import NonFiniteLossError

    trainer = _bare_trainer(overrides)
    model = trainer.components.model
    trainer.train_step(_batch(0))
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    handle = model.logit_scale.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    try:
        step = trainer.train_step(_batch(1))
        outcome = ("skipped", step.skipped, trainer.state.skipped_steps, trainer.read_stats([step])[0])
    except NonFiniteLossError as err:
        outcome = ("stopped", str(err), trainer.state.step, None)
    handle.remove()
    unchanged = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    return outcome, unchanged, trainer.engine.skipped_steps


@pytest.mark.heavy
@pytest.mark.parametrize("zero, precision", [(1, "fp32"), (2, "fp32"), (1, "bf16")])
def test_an_optimizer_step_deepspeed_skips_is_a_skipped_step(zero, precision):
    common = [f"deepspeed.zero_stage={zero}", f"fast_path.precision={precision}"]
    (outcome, unchanged, ds_skipped), = run_on_ranks(_overflowing_gradient, 1, [*common, "train.nonfinite=skip"])
    kind, skipped, count, stats = outcome
    assert (kind, skipped, count, ds_skipped) == ("skipped", True, 1, 1) and unchanged
    assert stats["train/skipped_steps"] == 1
    (outcome, unchanged, _), = run_on_ranks(_overflowing_gradient, 1, [*common, "train.nonfinite=stop"])
    assert outcome[0] == "stopped" and outcome[2] == 1 and unchanged
    assert "step 1:" in outcome[1] and "DeepSpeed" in outcome[1] and "skipped the optimizer step" in outcome[1]


# --------------------------------------------------------------------------------------- a real overflow
def _train(rank: int, world_size: int, overrides: list[str]):
    from alignclip.config import load_config
    from alignclip.training.trainer import NonFiniteLossError, train

    try:
        result = train(load_config(None, overrides))
        return ("finished", result.step, [loss for _, loss in result.losses])
    except NonFiniteLossError as err:
        return ("stopped", str(err), None)


@pytest.mark.heavy
def test_an_overflowing_run_stops_naming_the_step_or_counts_its_skips(tmp_path):
    """lr = 1e20 blows the tiny model's weights up after one update: the next loss is non-finite."""

    data = {"train": write_toy_shards(tmp_path / "train", num_shards=2, per_shard=32),
            "val": write_toy_shards(tmp_path / "val", num_shards=1, per_shard=16, seed=1)}
    blow_up = {"optim.lr": 1e20, "optim.warmup_steps": 0, "train.max_steps": 6, "logging.gap_every_steps": 1}
    stop = tiny_overrides(data, tmp_path / "stop", **blow_up)
    kind, message, _ = run_on_ranks(_train, 1, stop)[0]
    assert kind == "stopped" and message.startswith("step 1: non-finite loss term"), message

    skip = tiny_overrides(data, tmp_path / "skip", **blow_up, **{"train.nonfinite": "skip",
                                                                 "train.max_skipped_steps": 3})
    kind, message, _ = run_on_ranks(_train, 1, skip)[0]
    # steps 1, 2, 3 skipped; the fourth in a row stops the run, naming the count
    assert kind == "stopped" and message.startswith("step 4:") and "after 3 skipped steps in a row" in message
    events = scalar_events(tmp_path / "skip")
    assert dict(events["train/skipped_steps"]) == {1: 0, 2: 1, 3: 2, 4: 3}
    temperature = dict(events["train/temperature"])  # a non-finite scale is logged, never a crash
    assert math.isfinite(temperature[1]) and not math.isfinite(dict(events["loss/total"])[2])


# ------------------------------------------------------------------------------------------- failed resume
@pytest.mark.heavy
def test_a_failed_resume_leaves_the_run_config_alone(tmp_path):

    data = {"train": write_toy_shards(tmp_path / "train", num_shards=1, per_shard=32),
            "val": write_toy_shards(tmp_path / "val", num_shards=1, per_shard=16, seed=1)}
    first = tiny_overrides(data, tmp_path / "run", **{"train.max_steps": 1})
    assert run_on_ranks(_train, 1, first)[0][0] == "finished"
    saved = (tmp_path / "run" / "config.yaml").read_text()
    wider = tiny_overrides(data, tmp_path / "run", **{"train.max_steps": 2, "model.embed_dim": 64})
    # refused by the plan before the model is built: the key with its values, no state-dict mismatch, and the
    # intact checkpoint is not called unusable
    with pytest.raises(AssertionError, match=r"ConfigChangeError: the model differs .* model.embed_dim: 32 -> 64") \
            as err:
        run_on_ranks(_train, 1, wider)
    assert "size mismatch" not in str(err.value) and "unusable" not in str(err.value)
    assert (tmp_path / "run" / "config.yaml").read_text() == saved


# ------------------------------------------------------------------------- a set-up that fails late
def _init_fails(rank: int, world_size: int, overrides: list[str]):
    import signal

    from alignclip.config import load_config
    from alignclip.training.trainer import Trainer

    default = signal.getsignal(signal.SIGTERM)
    try:
        Trainer(load_config(None, overrides))
    except ValueError as err:
        return str(err), signal.getsignal(signal.SIGTERM) == default
    return None, False


@pytest.mark.heavy
def test_a_set_up_failing_after_the_monitor_exists_closes_it_and_restores_the_handlers(tmp_path):
    """An empty validation shard fails the held-out batch, the last thing set-up builds: the TensorBoard events
    written so far (the run's config) reach disk and SIGTERM is ours no longer."""
    import tarfile

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (tmp_path / "val").mkdir()
    tarfile.open(tmp_path / "val" / "00000.tar", "w").close()
    data = {"train": write_toy_shards(tmp_path / "train", num_shards=1, per_shard=32), "val": str(tmp_path / "val")}
    (message, restored), = run_on_ranks(_init_fails, 1, tiny_overrides(data, tmp_path / "run"))
    assert message is not None and "no usable sample in the validation shards" in message, message
    assert restored
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    assert "config/text_summary" in events.Tags()["tensors"]  # flushed by close(): the writer was not left open


# ------------------------------------------------------------------------ an old run directory resumes
@pytest.mark.heavy
def test_a_run_directory_from_before_the_config_split_resumes(tmp_path):
    """Its config.yaml keeps optim / checkpoint / fast_path keys in ``train``: ``--config RUN/config.yaml``
    loads it (one deprecation warning naming old -> new) and continues from its checkpoint."""
    import os
    import subprocess



    data = {"train": write_toy_shards(tmp_path / "train", num_shards=1, per_shard=32),
            "val": write_toy_shards(tmp_path / "val", num_shards=1, per_shard=16, seed=1)}
    run = tmp_path / "run"
    assert run_on_ranks(_train, 1, tiny_overrides(data, run, **{"train.max_steps": 1}))[0][0] == "finished"
    saved = run / "config.yaml"
    saved.write_text(to_old_layout(saved.read_text()).replace("  norm_eps: 1.0e-05\n", ""))  # and before norm_eps
    assert "norm_eps" not in saved.read_text()
    proc = subprocess.run([sys.executable, "-m", "alignclip.train", "--config", str(saved), "train.max_steps=2"],
                          env={k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")},
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("deprecated config keys") == 1 and "train.lr -> optim.lr" in proc.stderr
    log = (run / "train.log").read_text()
    assert "resumed from" in log and "at step 1" in log and "done: 2 steps" in log
    # the run trained with the old mixed LayerNorm eps, and keeps them, not today's default of 1e-5
    assert "the run predates model.norm_eps" in log
    assert "norm_eps: null" in saved.read_text()
