"""tools/bench_step.py end to end on the tiny AlignCLIP; the fast-path switches as working paths; the trainer logs
its model TFLOP/s and MFU to TensorBoard."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO_ROOT
from tests.helpers.ranks import run_on_ranks

COLUMNS = ["case", "batch", "samples/s", "step ms", "data", "fwd", "loss", "bwd", "optim", "GFLOP/sample",
           "TFLOP/s", "MFU", "peak GiB", "warm-up s"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _rows(stdout: str) -> dict[str, list[str]]:
    lines = stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("case "))
    assert all(column in lines[head] for column in COLUMNS), lines[head]
    rows = {}
    for line in lines[head + 2:]:
        label, _, rest = line.partition("  ")  # labels may hold single spaces; columns are right-aligned
        rows[label.strip()] = rest.split()
    return rows


@pytest.mark.heavy  # the benchmark script end to end in a subprocess (DeepSpeed engines)
def test_bench_step_prints_one_consistent_table_for_the_tiny_alignclip():
    batch, peak = 8, 2.0
    cmd = [sys.executable, "tools/bench_step.py", "--config", "configs/model/alignclip_tiny.yaml", "--batch",
           str(batch), "--steps", "3", "--warmup", "1", "--peak-tflops", str(peak), "--base-label", "base",
           "--variant", "adamw loop: optim.adamw_impl=loop"]
    out = subprocess.run(cmd, env=_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = _rows(out.stdout)
    assert set(rows) == {"base", "adamw loop"}, out.stdout
    from alignclip.config import load_config
    from alignclip.training.flops import step_flops

    gflop = step_flops(load_config("configs/model/alignclip_tiny.yaml"), global_batch=batch).total / 1e9
    for label, cells in rows.items():
        values = [float(c.rstrip("%")) for c in cells]
        n, samples_per_s, step_ms, data, fwd, loss, bwd, optim, gflop_row, tflops, mfu, mem, warmup_s = values
        assert warmup_s > 0
        assert n == batch and all(v > 0 for v in (samples_per_s, step_ms, fwd, loss, bwd, optim, tflops, mem))
        assert data >= 0
        # The columns are derived from one another; each check allows exactly the rounding of the printed
        # figures (samples/s 2 decimals, ms 1, TFLOP/s 4, MFU 1), so it holds whatever the machine's speed.
        slow, fast = batch / ((step_ms + 0.05) / 1e3), batch / ((step_ms - 0.05) / 1e3)
        assert slow - 0.005 <= samples_per_s <= fast + 0.005
        # a phase's median never exceeds the median step (each step's phase is part of that step)
        assert max(data, fwd, loss, bwd, optim) <= step_ms + 0.1
        assert gflop_row == pytest.approx(gflop, rel=1e-3)
        assert abs(tflops - gflop * samples_per_s / 1e3) <= 0.5e-4 + gflop * 0.005 / 1e3 + 1e-9
        assert abs(mfu - 100 * tflops / peak) <= 0.05 + 100 * 0.5e-4 / peak + 1e-9
    assert "adamw=loop" in out.stdout and "adamw=fused" in out.stdout  # each row says its switches


def test_adamw_implementations_take_the_same_step():
    from alignclip.config import load_config
    from alignclip.models import build_model
    from alignclip.training.optim import build_optimizer

    config = load_config("configs/model/clip_tiny.yaml")
    weights = {}
    for impl in ("fused", "foreach", "loop"):
        torch.manual_seed(0)
        model = build_model(config.model)
        opt = build_optimizer(model, config.optim, impl)
        images, tokens = torch.randn(2, 3, 64, 64), torch.randint(0, 49407, (2, 32))
        out = model(images, tokens)
        (out["image_embeds"] @ out["text_embeds"].T).sum().backward()
        opt.step()
        weights[impl] = torch.cat([p.detach().flatten() for p in model.parameters()])
    # One step from identical weights and gradients, so only the optimizer's arithmetic differs. (A second step
    # would not compare: Adam's first update is ~lr sign(g), and rounding noise flips the sign of near-zero
    # gradients, moving such entries by up to 2 lr between implementations.)
    assert torch.equal(weights["foreach"], weights["loop"])
    assert torch.allclose(weights["fused"], weights["loop"], rtol=0, atol=1e-4 * config.optim.lr)


def test_auto_switches_resolve_per_device():
    from alignclip.config import load_config
    from alignclip.training.fast_path import resolve_fast_path

    config = load_config("configs/model/alignclip_vit_b16.yaml")
    gpu, cpu = resolve_fast_path(config, "cuda"), resolve_fast_path(config, "cpu")
    assert (gpu.precision, gpu.compile, gpu.adamw_impl, gpu.sdpa, gpu.channels_last, gpu.non_blocking) == \
        ("bf16", True, "fused", True, True, True)
    assert (cpu.precision, cpu.compile, cpu.adamw_impl, cpu.sdpa, cpu.non_blocking) == \
        ("fp32", False, "fused", True, False)
    forced = resolve_fast_path(load_config("configs/model/alignclip_vit_b16.yaml", ["fast_path.compile=false"]), "cuda")
    assert forced.compile is False


def _compiled_engine_keys(rank: int, world_size: int):
    from alignclip.config import load_config
    from alignclip.models import build_model
    from alignclip.training.fast_path import compile_engine, resolve_fast_path
    from alignclip.training.deepspeed_config import build_deepspeed_config
    from alignclip.training.engine import initialize_engine
    from alignclip.training.optim import build_optimizer

    config = load_config("configs/model/clip_tiny.yaml", ["fast_path.compile=true", "train.global_batch_size=2",
                                                          "fast_path.precision=fp32"])
    fast = resolve_fast_path(config, "cpu")
    model = build_model(config.model)
    plain_keys = list(model.state_dict())
    engine = initialize_engine(model, build_optimizer(model, config.optim, fast.adamw_impl),
                               build_deepspeed_config(config, 1, "cpu"))
    compile_engine(engine, fast, backend="eager")  # dynamo's graph capture without inductor's C++ build
    out = engine(torch.randn(2, 3, 64, 64), torch.randint(0, 49407, (2, 32)))
    engine.backward((out["image_embeds"] * out["text_embeds"]).sum())
    engine.step()
    return engine.is_compiled, plain_keys, list(engine.module.state_dict())


@pytest.mark.heavy
def test_compiled_engine_keeps_clean_checkpoint_keys():
    (compiled, plain, after), = run_on_ranks(_compiled_engine_keys, 1)
    assert compiled and after == plain and not any("_orig_mod" in k for k in after)


def _train_with_peak(rank: int, world_size: int, overrides: list[str]):
    from alignclip.config import load_config
    from alignclip.training.trainer import train

    result = train(load_config(None, overrides))
    return result.exit_code


@pytest.mark.heavy
def test_trainer_logs_model_tflops_and_mfu_to_tensorboard(tmp_path):
    from tests.helpers.tiny import scalar_events, tiny_overrides, write_toy_shards

    data = {"train": write_toy_shards(tmp_path / "train", num_shards=2, per_shard=16),
            "val": write_toy_shards(tmp_path / "val", num_shards=1, per_shard=16, seed=1)}
    overrides = tiny_overrides(data, tmp_path / "run", **{"train.max_steps": 2, "fast_path.peak_tflops": 0.5})
    assert run_on_ranks(_train_with_peak, 1, overrides) == [0]
    events = scalar_events(tmp_path / "run")
    tflops, mfu, rate = (dict(events[t]) for t in ("perf/tflops_per_device", "perf/mfu", "perf/samples_per_s"))
    assert sorted(tflops) == sorted(mfu) == [1, 2]

    from alignclip.config import load_config
    from alignclip.training.flops import step_flops

    per_sample = step_flops(load_config(None, overrides)).total
    for step in (1, 2):
        assert tflops[step] == pytest.approx(rate[step] * per_sample / 1e12, rel=1e-4)
        assert mfu[step] == pytest.approx(tflops[step] / 0.5, rel=1e-4)
