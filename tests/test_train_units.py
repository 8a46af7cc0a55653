"""Unit tests of the trainer's pure parts: schedule, parameter groups, DeepSpeed config derivation, rank set-up,
checkpoint bookkeeping, preemption flag."""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch
from torch import nn

from alignclip import checkpoints
from alignclip.config import ConfigError, load_config
from alignclip.distributed.env import detect, expand_nodelist, port_for_job, setup_distributed_env, tasks_on_node
from alignclip.training import checkpoint as ckpt
from alignclip.distributed.layout import batch_layout
from alignclip.training.deepspeed_config import build_deepspeed_config, write_deepspeed_config
from alignclip.training.optim import build_optimizer, param_groups, scale_text_gradient
from alignclip.distributed.process import any_rank
from alignclip.training.preemption import REQUEUE_EXIT_CODE, PreemptionFlag
from alignclip.training.schedule import lr_at, set_lr


# ------------------------------------------------------------------------------------------------ schedule
def test_warmup_is_linear_and_reaches_base_lr_at_the_last_warmup_step():
    lrs = [lr_at(s, 1e-3, warmup_steps=10, total_steps=100) for s in range(10)]
    assert lrs == pytest.approx([1e-3 * (s + 1) / 10 for s in range(10)])
    assert lr_at(10, 1e-3, 10, 100) == pytest.approx(1e-3)  # cosine starts at the top


def test_cosine_decays_to_min_lr_and_stays_there():
    base, floor, w, total = 1e-3, 1e-5, 10, 110
    mid = lr_at(w + 50, base, w, total, floor)
    assert mid == pytest.approx(floor + (base - floor) * 0.5)  # half way: cos(pi/2) = 0
    decay = [lr_at(s, base, w, total, floor) for s in range(w, total)]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert lr_at(total, base, w, total, floor) == floor and lr_at(total + 7, base, w, total, floor) == floor


def test_schedule_is_a_pure_function_of_the_step():
    forward = [lr_at(s, 1e-3, 5, 50) for s in range(50)]
    backward = [lr_at(s, 1e-3, 5, 50) for s in reversed(range(50))][::-1]
    assert forward == backward  # no hidden state: a resumed run gets the same lr for the same step


def test_paper_recipe_lr_after_warmup_of_10000_steps():
    total = 30 * (10_000_000 // 512)
    assert lr_at(9_999, 1e-3, 10_000, total) == pytest.approx(1e-3)
    assert lr_at(total - 1, 1e-3, 10_000, total) < 1e-8


# ----------------------------------------------------------------------------------------- param groups
class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 3))  # effectively 1-d
        self.pos = nn.Parameter(torch.zeros(5, 3))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.frozen = nn.Parameter(torch.zeros(3, 3), requires_grad=False)


def test_weight_decay_only_on_matrices():
    model = _Toy()
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in decay["params"]) == ["pos", "proj.weight"]
    assert sorted(names[id(p)] for p in no_decay["params"]) == ["cls_token", "logit_scale", "norm.bias",
                                                                  "norm.weight", "proj.bias"]
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


@pytest.mark.parametrize("arch, text_only", [("clip", ("text_stem.", "text_trunk.")), ("sharedclip", ("text_stem.",))])
def test_text_lr_scale_gives_the_text_only_parameters_groups_of_their_own(arch, text_only):
    from alignclip.models import build_model

    config = load_config(f"model/{arch}_tiny", ["optim.text_lr_scale=0.25", "optim.weight_decay=0.2"])
    model = build_model(config.model)
    names = {id(p): n for n, p in model.named_parameters()}
    opt = build_optimizer(model, config.optim)
    set_lr(opt, 1e-3)
    seen = []
    for group in opt.param_groups:
        text = group["name"].endswith("_text")
        assert all(names[id(p)].startswith(text_only) == text for p in group["params"]), group["name"]
        assert group["lr"] == pytest.approx(2.5e-4 if text else 1e-3)
        assert group["weight_decay"] == (0.0 if group["name"].startswith("no_decay") else 0.2)
        seen += [names[id(p)] for p in group["params"]]
    assert sorted(seen) == sorted(names.values())  # every parameter once
    plain = build_optimizer(model, load_config(f"model/{arch}_tiny").optim)
    assert [g["name"] for g in plain.param_groups] == ["decay", "no_decay"]


def test_the_shared_trunk_takes_the_text_paths_gradient_at_the_text_lr_scale():
    """SharedCLIP: d/dtheta of image loss + text loss with the text embeddings' gradient scaled by s equals
    g_image + s g_text for the shared trunk; CLIP's text embeddings pass untouched."""
    from alignclip.models import build_model

    torch.manual_seed(0)
    model = build_model(load_config("model/sharedclip_tiny").model)
    images = torch.randn(3, 3, 64, 64)
    tokens = torch.randint(1, 400, (3, 32))
    tokens[:, 5] = 49407

    def grads(image_weight: float, text_weight: float, scale: float) -> list[torch.Tensor]:
        model.zero_grad()
        out = model(images, tokens)
        text = scale_text_gradient(out["text_embeds"], model, scale)
        (image_weight * out["image_embeds"].pow(2).sum() + text_weight * text.pow(3).sum()).backward()
        return [p.grad.clone() for p in model.trunk.parameters()]

    scaled, image_only, text_only = grads(1, 1, 0.1), grads(1, 0, 1.0), grads(0, 1, 1.0)
    for g, gi, gt in zip(scaled, image_only, text_only):
        torch.testing.assert_close(g, gi + 0.1 * gt, rtol=1e-5, atol=1e-7)
    assert any(gt.abs().sum() > 0 for gt in text_only)
    clip = build_model(load_config("model/clip_tiny").model)
    embeds = torch.randn(2, 4)
    assert scale_text_gradient(embeds, clip, 0.1) is embeds


def test_optimizer_is_adamw_with_the_configured_betas_and_eps():
    cfg = load_config(None, ["optim.beta2=0.98", "optim.eps=1e-6", "optim.weight_decay=0.2"]).optim
    opt = build_optimizer(_Toy(), cfg)
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.0]
    assert all(g["betas"] == (0.9, 0.98) and g["eps"] == 1e-6 for g in opt.param_groups)


def test_real_model_logit_scale_and_norms_are_exempt():
    from alignclip.models import build_model

    model = build_model(load_config("model/clip_tiny").model)
    decay, no_decay = param_groups(model, 0.1)
    exempt = {n for n, p in model.named_parameters() if any(p is q for q in no_decay["params"])}
    assert "logit_scale" in exempt
    assert all(p.dim() >= 2 for p in decay["params"])
    assert not any(n.endswith(".bias") for n, p in model.named_parameters() if any(p is q for q in decay["params"]))


# ------------------------------------------------------------------------------------ DeepSpeed config
def test_batch_sizes_multiply_to_the_global_batch():
    cfg = load_config(None, ["train.global_batch_size=512"])
    ds = build_deepspeed_config(cfg, world_size=8, device="cuda")
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == \
        (512, 64, 1)
    cfg = load_config(None, ["train.global_batch_size=512", "train.micro_batch_size=16"])
    layout = batch_layout(cfg, world_size=8)
    assert (layout.micro_batch, layout.accumulation) == (16, 4)
    assert layout.micro_batch * layout.accumulation * layout.world_size == 512


def test_inconsistent_batch_sizes_name_the_keys():
    with pytest.raises(ConfigError, match="train.global_batch_size.*world size"):
        batch_layout(load_config(None, ["train.global_batch_size=10"]), world_size=4)
    with pytest.raises(ConfigError, match="train.micro_batch_size"):
        batch_layout(load_config(None, ["train.global_batch_size=512", "train.micro_batch_size=24"]), world_size=8)


def test_precision_zero_stage_and_clipping_come_from_the_config(tmp_path):
    cfg = load_config(None, ["deepspeed.zero_stage=2", "optim.grad_clip=0.5"])
    gpu = build_deepspeed_config(cfg, 1, device="cuda")
    cpu = build_deepspeed_config(cfg, 1, device="cpu")
    assert gpu["bf16"]["enabled"] and not cpu["bf16"]["enabled"]  # auto: bf16 on GPU, fp32 on CPU
    assert not gpu["fp16"]["enabled"]
    assert gpu["zero_optimization"]["stage"] == 2 and gpu["gradient_clipping"] == 0.5
    assert gpu["zero_optimization"]["overlap_comm"] and not cpu["zero_optimization"]["overlap_comm"]
    bf16_cpu = build_deepspeed_config(load_config(None, ["fast_path.precision=bf16"]), 1, device="cpu")
    assert bf16_cpu["bf16"]["enabled"]
    assert "optimizer" not in gpu and "scheduler" not in gpu  # ours: param groups and a pure schedule
    import json

    assert json.loads(write_deepspeed_config(gpu, tmp_path).read_text()) == gpu


def test_paper_recipes_derive_a_consistent_deepspeed_config():
    from alignclip.config import CONFIG_DIR

    for name in ("cc12m_clip", "cc12m_sharedclip", "cc12m_alignclip"):
        cfg = load_config(CONFIG_DIR / "experiment" / f"{name}.yaml")
        o, t = cfg.optim, cfg.train
        assert (o.lr, o.warmup_steps, o.weight_decay, t.global_batch_size, t.epochs) == (1e-3, 10_000, 0.1, 512, 30)
        assert cfg.model.init_temperature == 0.07
        for world in (1, 8, 16):
            ds = build_deepspeed_config(cfg, world, device="cuda")
            assert ds["train_batch_size"] == 512 and ds["bf16"]["enabled"]
    align = load_config(CONFIG_DIR / "experiment" / "cc12m_alignclip.yaml").loss
    assert (align.crsep_weight, align.imsep_weight, align.clip_weight) == (1.0, 0.5, 0.0)
    assert align.semantic_model.endswith("all-mpnet-base-v2") and align.imsep_sides == "image"


# ---------------------------------------------------------------------------------------------- rank set-up
def test_torchrun_variables_win():
    env = detect({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
                  "MASTER_ADDR": "n1", "MASTER_PORT": "1234", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.node_rank, env.source) == \
        (3, 8, 1, 2, 1, "torchrun")
    assert (env.master_addr, env.master_port) == ("n1", 1234)


def test_slurm_step_variables():
    env = detect({"SLURM_PROCID": "5", "SLURM_NTASKS": "6", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
                  "SLURM_TASKS_PER_NODE": "2(x3)", "SLURM_JOB_NODELIST": "gpu[07-09]", "SLURM_JOB_ID": "4242",
                  "SLURM_STEP_ID": "0"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.node_rank) == (5, 6, 1, 2, 2)
    assert env.master_addr == "gpu07" and env.master_port == port_for_job("4242") and env.source == "slurm"


def test_slurm_batch_shell_without_srun_is_a_single_process():
    env = detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "gpu1"})
    assert (env.world_size, env.source) == (1, "single")


def test_submitit_local_variables():
    env = detect({"SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_NTASKS": "2", "SUBMITIT_LOCAL_LOCALID": "1",
                  "SUBMITIT_LOCAL_NODEID": "0", "SUBMITIT_LOCAL_JOB_ID": "777"})
    assert (env.rank, env.world_size, env.local_rank, env.source) == (1, 2, 1, "submitit")
    assert env.master_port == port_for_job("777")


def test_setup_exports_the_torchrun_variables():
    environ = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "9", "SLURM_JOB_NODELIST": "a[1-2]"}
    env = setup_distributed_env(environ)
    assert environ["RANK"] == "0" and environ["WORLD_SIZE"] == "1" and environ["MASTER_ADDR"] == "a1"
    assert environ["MASTER_PORT"] == str(env.master_port)


def test_nodelist_and_tasks_per_node_parsing():
    assert expand_nodelist("gpu[08-10,12],cpu1") == ["gpu08", "gpu09", "gpu10", "gpu12", "cpu1"]
    assert expand_nodelist("node1") == ["node1"]
    assert [tasks_on_node("4(x2),3", n) for n in range(3)] == [4, 4, 3]


# ------------------------------------------------------------------------------------ checkpoint bookkeeping
def _fake_checkpoint(root, step: int, complete: bool = True):
    d = root / checkpoints.step_name(step)
    d.mkdir(parents=True)
    if complete:
        (d / checkpoints.STATE_FILE).write_text('{"step": %d}' % step)
    return d


def test_find_latest_skips_incomplete_and_follows_the_pointer(tmp_path):
    root = checkpoints.checkpoints_dir(tmp_path)
    assert checkpoints.find_latest(tmp_path) is None
    _fake_checkpoint(root, 10)
    _fake_checkpoint(root, 20)
    _fake_checkpoint(root, 30, complete=False)  # a directory without trainer_state.json is not a checkpoint
    (root / "step_00000040.tmp").mkdir()
    assert checkpoints.find_latest(tmp_path) == root / checkpoints.step_name(20)
    (root / checkpoints.LATEST).write_text(checkpoints.step_name(10) + "\n")
    assert checkpoints.find_latest(tmp_path) == root / checkpoints.step_name(10)
    (root / checkpoints.LATEST).write_text(checkpoints.step_name(99) + "\n")  # dangling pointer: newest complete instead
    assert checkpoints.find_latest(tmp_path) == root / checkpoints.step_name(20)


def test_prune_keeps_the_newest_k(tmp_path):
    root = checkpoints.checkpoints_dir(tmp_path)
    for step in (1, 2, 3, 4, 5):
        _fake_checkpoint(root, step)
    ckpt.prune(root, keep=2)
    assert [p.name for p in checkpoints.complete_checkpoints(root)] == [checkpoints.step_name(s) for s in (4, 5)]


def test_resume_with_another_world_size_says_how_to_convert(tmp_path):
    state = checkpoints.TrainerState(step=5, world_size=8)
    expected = "(?s)restart with 8 ranks.*universal_checkpoint=true.*ds_to_universal"
    with pytest.raises(ckpt.CheckpointWorldSizeError, match=expected):
        ckpt.check_world_size(state, tmp_path / "step_00000005", world_size=4, universal=False)
    ckpt.check_world_size(state, tmp_path, world_size=4, universal=True)
    ckpt.check_world_size(state, tmp_path, world_size=8, universal=False)


def test_a_text_lr_scale_across_1_stops_naming_the_key_and_what_to_do(tmp_path):
    checkpoint = tmp_path / "step_00000005"
    below = checkpoints.TrainerState(step=5, text_lr_scale=0.1)
    expected = ("(?s)key 'optim.text_lr_scale' is 1 but checkpoint .*step_00000005 was written with 0.1.*"
                "checkpoint is fine.*resume with optim.text_lr_scale=0.1 \\(or any other value below 1\\).*"
                "new run directory")
    with pytest.raises(ckpt.ConfigChangeError, match=expected) as caught:
        ckpt.check_text_lr_scale(below, checkpoint, 1.0)
    assert isinstance(caught.value, ConfigError) and not isinstance(caught.value, checkpoints.CheckpointError)
    with pytest.raises(ckpt.ConfigChangeError, match="is 0.2 but .* written with 1: .*optim.text_lr_scale=1, "):
        ckpt.check_text_lr_scale(checkpoints.TrainerState(text_lr_scale=1.0), checkpoint, 0.2)
    ckpt.check_text_lr_scale(below, checkpoint, 0.2)  # the same layout: load_checkpoint applies the new value
    ckpt.check_text_lr_scale(checkpoints.TrainerState(text_lr_scale=1.0), checkpoint, 1.0)


def test_a_trainer_state_without_text_lr_scale_takes_the_run_directorys_config(tmp_path):
    """Checkpoints written before the state recorded the scale: the run's config.yaml says how they were trained
    (a config from before the key existed: 1); without a config.yaml nothing is checked."""
    from alignclip.config import save_config

    legacy = _fake_checkpoint(checkpoints.checkpoints_dir(tmp_path), 7)
    state = checkpoints.read_state(legacy)
    assert state.text_lr_scale is None
    assert ckpt.trained_text_lr_scale(state, legacy) is None
    ckpt.check_text_lr_scale(state, legacy, 0.1)
    save_config(load_config(None, ["optim.text_lr_scale=0.1"]), tmp_path)
    assert ckpt.trained_text_lr_scale(state, legacy) == pytest.approx(0.1)
    ckpt.check_text_lr_scale(state, legacy, 0.3)
    with pytest.raises(ckpt.ConfigChangeError, match="written with 0.1"):
        ckpt.check_text_lr_scale(state, legacy, 1.0)
    (tmp_path / "config.yaml").write_text("train:\n  lr: 0.001\n")  # the layout before the key existed
    assert ckpt.trained_text_lr_scale(state, legacy) == 1.0
    with pytest.raises(ckpt.ConfigChangeError, match="written with 1:"):
        ckpt.check_text_lr_scale(state, legacy, 0.1)
    # the state's own record wins over the config
    assert ckpt.trained_text_lr_scale(checkpoints.TrainerState(text_lr_scale=0.25), legacy) == 0.25


def test_the_optimizer_groups_keep_this_runs_hyper_parameters_over_a_loaded_state():
    """What a checkpoint load does to the groups (torch's load_state_dict restores each group's values as saved),
    undone by restore_group_settings: the moments come from the checkpoint, the hyper-parameters from the config."""
    from alignclip.training.optim import group_settings, restore_group_settings

    model = _Toy()
    old = build_optimizer(model, load_config(None, ["optim.weight_decay=0.3", "optim.beta2=0.95"]).optim)
    new = build_optimizer(model, load_config(None, ["optim.weight_decay=0.1"]).optim)
    settings = group_settings(new)
    new.load_state_dict(old.state_dict())
    assert [g["weight_decay"] for g in new.param_groups] == [0.3, 0.0]  # the saved values, as torch loads them
    restore_group_settings(new, settings)
    assert [(g["weight_decay"], g["betas"], g["lr_scale"]) for g in new.param_groups] == [
        (0.1, (0.9, 0.98), 1.0), (0.0, (0.9, 0.98), 1.0)]
    with pytest.raises(RuntimeError, match="has 2 parameter groups, expected 3"):
        restore_group_settings(new, settings + [{}])


def test_rng_state_round_trip():
    import random

    import numpy as np

    saved = ckpt.capture_rng()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    ckpt.restore_rng(saved)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and (expected[1] == again[1]).all() and expected[2] == again[2]


# ---------------------------------------------------------------------------------------------- preemption
def test_signal_sets_the_flag_and_the_exit_code_is_documented():
    assert REQUEUE_EXIT_CODE not in (0, 1, 2)
    flag = PreemptionFlag()
    try:
        assert not flag.agree()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag.agree() and "SIGUSR1" in flag.describe()
    finally:
        flag.restore()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    assert any_rank(True) and not any_rank(False)


def _any_rank_on(rank: int, world_size: int):
    return any_rank(rank == 1)


@pytest.mark.heavy  # two spawned processes in a gloo group
def test_any_rank_agrees_across_processes():
    from tests.helpers.ranks import run_on_ranks

    assert run_on_ranks(_any_rank_on, 2) == [True, True]


# ------------------------------------------------------------------------------------------------ the command
@pytest.mark.parametrize("argv, code", [(["model.arch=nope"], 2), (["--help"], 0)])
def test_the_command_keeps_exit_codes_output_and_atexit_handlers_when_it_skips_the_teardown(argv, code):
    """``cli`` leaves with ``os._exit``: the exit code, buffered output and registered atexit handlers survive."""
    import subprocess
    import sys

    script = ("import atexit, sys; atexit.register(lambda: print('atexit ran', flush=True)); "
              "sys.stdout.write('buffered '); from alignclip.train import cli; cli()")
    done = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONUNBUFFERED": ""})
    assert done.returncode == code, done.stderr
    assert done.stdout.startswith("buffered ") and done.stdout.rstrip().endswith("atexit ran"), done.stdout
    if code == 2:
        assert "model.arch" in done.stderr
