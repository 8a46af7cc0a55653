"""tools/gpu_check.py: without a GPU it exits 2 at once with its reason; its CPU-capable rows run at tiny sizes
(--cpu-smoke: Triton under the interpreter in fp32, the chunked loss, gloo ranks, the tiny model's step, the data
path on a tiny generated shard); the verdicts decide the exit code and the table / JSON show every row."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gpu_check  # tools/ is on the tests' path (pyproject: pythonpath)
import gpu_check_rows as rows_lib
from gpu_check_rows import ERROR, FAIL, INFO, NOT_APPLICABLE, PASS, SKIP, WARN, Row
from tests.helpers import REPO_ROOT

SCRIPT = REPO_ROOT / "tools" / "gpu_check.py"

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")


@no_gpu
def test_without_a_gpu_it_exits_2_with_its_reason_and_no_traceback():
    out = subprocess.run([sys.executable, str(SCRIPT), "--json", "unused.json"], capture_output=True, text=True,
                         timeout=120, cwd="/tmp")
    assert out.returncode == 2, out.stderr
    assert "no NVIDIA GPU" in out.stderr or "sees no CUDA GPU" in out.stderr
    assert "--cpu-smoke" in out.stderr and "Traceback" not in out.stderr
    assert out.stdout == "" and not Path("/tmp/unused.json").exists()


@no_gpu
def test_with_a_device_node_but_no_cuda_torch_gives_the_reason():
    # a device node that exists (any path) sends the check on to torch, which sees no GPU here
    reason = gpu_check.no_gpu_reason(device_nodes=(str(REPO_ROOT),))
    assert reason.startswith(f"torch {torch.__version__}") and "sees no CUDA GPU" in reason


def test_bad_arguments_are_one_line_errors_before_anything_runs():
    out = subprocess.run([sys.executable, str(SCRIPT), "--budget-min", "0"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and out.stderr.strip() == "gpu_check: --budget-min must be > 0, got 0.0 (see --help)"
    out = subprocess.run([sys.executable, str(SCRIPT), "--json", "/nonexistent/table.json"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.startswith("gpu_check: --json /nonexistent/table.json: its folder")
    assert len(out.stderr.strip().splitlines()) == 1


def test_a_step_config_typo_is_found_before_any_row_runs():
    step = {"compile": True, "precision": "bf16", "batch": 256}
    assert gpu_check.config_problem([("step_compiled", {**step, "config": "model/alignclip_vit_b16"})]) is None
    problem = gpu_check.config_problem([("environment", {}), ("step_compiled", {**step, "config": "model/nope"})])
    assert problem.startswith("--step-config model/nope: config file not found")


def test_the_gpu_plan_covers_every_row_of_the_issue():
    groups = dict(gpu_check.plan(gpu_check.parse_args([]), gpus=2))
    assert list(groups) == ["environment", "loss", "distributed", "step_eager", "step_compiled", "data"]
    assert set(groups) == set(gpu_check.SHARES) and sum(gpu_check.SHARES.values()) == pytest.approx(1.0)
    loss = groups["loss"]
    assert (loss["impls"], loss["dtypes"], loss["batch_sizes"]) == (["triton", "chunked"], ["fp32", "bf16"],
                                                                     [1024, 8192])
    assert loss["device"] == "cuda" and loss["memory_batch"] == 32768 and loss["memory_impl"] == "triton"
    assert groups["distributed"]["backend"] == "nccl" and groups["distributed"]["world"] == 2
    for name, compiled in (("step_eager", False), ("step_compiled", True)):
        step = groups[name]
        assert step["config"] == "model/alignclip_vit_b16" and step["precision"] == "bf16"
        assert step["compile"] is compiled and step["device"] == "cuda"
    assert groups["data"]["gpus"] == 2
    assert gpu_check.config_problem(list(groups.items())) is None


def test_one_gpu_makes_the_nccl_row_not_applicable_without_starting_ranks():
    groups = [("distributed", dict(gpu_check.plan(gpu_check.parse_args([]), gpus=1))["distributed"])]
    rows = gpu_check.run_plan(groups, budget_s=60, gpus=1, child_env={})
    assert [(r.check, r.verdict, r.correctness) for r in rows] == [("nccl 2 ranks = 1 process", NOT_APPLICABLE,
                                                                     True)]
    assert rows_lib.exit_code(rows) == 0


def test_the_loader_is_sized_by_the_fastest_passing_step():
    def step(verdict, rate):
        return Row(f"step {rate}", verdict, "", True, {"samples_per_s": rate})

    assert gpu_check.step_rate([step(PASS, 900.0), step(PASS, 1100.0), step(FAIL, 5000.0)]) == 1100.0
    assert gpu_check.step_rate([Row("environment", PASS, ""), step(ERROR, 1.0)]) is None


def test_data_row_warns_when_the_node_has_too_few_cores_for_its_gpus():
    cores = len(os.sched_getaffinity(0))
    row = rows_lib.data_row(1e6, gpus=cores, samples=8, shards=1, source_size=40, image_size=32, batch=4, workers=1)
    figures = row.figures
    assert figures["samples_per_s_per_worker"] > 0 and figures["cores"] == cores
    assert figures["workers_per_gpu"] == math.ceil(1e6 / figures["samples_per_s_per_worker"])
    assert row.verdict == WARN and not row.correctness and row.holds()


def test_verdicts_decide_the_exit_code():
    def row(verdict, correctness):
        return Row(f"{verdict} {correctness}", verdict, "", correctness)

    assert rows_lib.exit_code([row(PASS, True), row(NOT_APPLICABLE, True), row(INFO, False), row(WARN, False),
                               row(SKIP, False)]) == 0
    assert rows_lib.exit_code([row(PASS, True), row(FAIL, True)]) == 1
    assert rows_lib.exit_code([row(PASS, True), row(SKIP, True)]) == 1  # a correctness check that never ran
    assert rows_lib.exit_code([row(PASS, True), row(ERROR, False)]) == 1  # a measurement that crashed
    assert rows_lib.exit_code([]) == 1


def test_a_group_that_crashes_in_its_child_is_an_error_row_naming_the_cause():
    rows = gpu_check.run_group_isolated("no such group", {}, timeout_s=300, env=dict(os.environ))
    assert len(rows) == 1 and rows[0].verdict == ERROR and "unknown group 'no such group'" in rows[0].result
    assert rows_lib.exit_code(rows) == 1


def test_a_failing_loss_row_fails_the_table_and_its_json():
    # chunked vs dense at a tolerance of 0: the single-process tile walks sum in another order than dense does
    kwargs = dict(dim=8, semantic_dim=4, device="cpu", repeats=1, chunk_size=4)
    held = rows_lib.loss_row("chunked", "fp32", 12, **kwargs)
    failed = rows_lib.loss_row("chunked", "fp32", 12, tolerance=0.0, **kwargs)
    assert held.verdict == PASS and held.correctness
    assert failed.verdict == FAIL and max(failed.figures["loss_rel_err"], failed.figures["grad_rel_err"]) > 0
    assert held.figures["loss_rel_err"] <= 1e-5 and held.figures["grad_rel_err"] <= 1e-5
    assert held.figures["fwd_bwd_x_dense"] > 0 and held.figures["peak_mib"] is None  # CPU: no CUDA memory
    rows = [Row("environment", INFO, "cpu"), held, failed]
    table = rows_lib.render_table(rows)
    lines = table.splitlines()
    assert [line.split()[0] for line in lines[2:5]] == ["environment", "loss", "loss"]
    assert lines[4].split()[4] == FAIL and lines[-1].startswith("1 row(s) do not hold (exit 1): loss chunked")
    payload = json.loads(rows_lib.rows_to_json(rows, {"gpus": 0}))
    assert payload["exit_code"] == 1 and payload["gpus"] == 0
    assert rows_lib.rows_from_json(payload["rows"]) == rows


@pytest.mark.heavy
@pytest.mark.timeout(2400)
def test_cpu_smoke_runs_every_cpu_capable_row(tmp_path):
    # --budget-min 30: a hang guard on a loaded machine, not a speed target
    out = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--budget-min", "30", "--json",
                          str(tmp_path / "table.json")], capture_output=True, text=True, timeout=2300)
    assert out.returncode == 0, out.stdout + out.stderr[-4000:]
    payload = json.loads((tmp_path / "table.json").read_text())
    rows = {row["check"]: row for row in payload["rows"]}
    assert payload["exit_code"] == 0 and payload["cpu_smoke"]
    expected = ["environment", "loss triton fp32 b=16", "loss triton fp32 b=40", "loss chunked fp32 b=16",
                "loss chunked fp32 b=40", "memory triton fp32 b=48", "gloo 2 ranks = 1 process",
                "step alignclip_tiny bf16 compile off", "data path, 1 worker(s)"]
    assert list(rows) == expected
    for check in expected:  # the printed table has each row with its verdict
        assert any(line.startswith(check) and rows[check]["verdict"] in line for line in out.stdout.splitlines())
    assert rows["environment"]["figures"]["torch"] == torch.__version__
    for check in expected[1:5]:  # the interpreted Triton kernels and the chunked loss equal dense
        assert rows[check]["verdict"] == PASS
        assert rows[check]["figures"]["loss_rel_err"] <= 1e-5 and rows[check]["figures"]["grad_rel_err"] <= 1e-5
    gloo = rows["gloo 2 ranks = 1 process"]
    assert gloo["verdict"] == PASS and set(gloo["figures"]["errors"]) == {"dense", "chunked"}

    step = rows["step alignclip_tiny bf16 compile off"]["figures"]
    from alignclip.config import load_config
    from alignclip.training.flops import semantic_dim_of, step_flops

    config = load_config("model/alignclip_tiny", ["train.global_batch_size=8"])
    flops = step_flops(config, global_batch=8, semantic_dim=semantic_dim_of(config.loss))
    assert step["gflop_per_sample"] == pytest.approx(flops.total / 1e9)  # the FLOP model's figure
    assert "precision=bf16" in step["fast_path"] and "adamw=fused" in step["fast_path"]
    assert step["samples_per_s"] > 0 and math.isfinite(step["loss"]) and step["mfu"] is None  # no CPU peak

    data = rows["data path, 1 worker(s)"]["figures"]
    assert data["step_samples_per_s"] == step["samples_per_s"]  # fed from the step row
    assert data["workers_per_gpu"] == math.ceil(step["samples_per_s"] / data["samples_per_s_per_worker"])


def test_device_decode_row_runs_the_device_path_on_cpu_tensors_and_matches_the_cpu_path():
    row = rows_lib.device_decode_row(1e4, samples=8, shards=1, source_size=40, image_size=32, batch=4, workers=1,
                                     device="cpu")
    figures = row.figures
    assert row.check == "data decode gpu" and row.verdict == INFO and not row.correctness
    assert figures["max_abs_diff"] == 0 and figures["device_samples_per_s"] > 0  # libjpeg-turbo on both sides
    assert figures["workers_per_gpu"] == math.ceil(1e4 / figures["worker_samples_per_s"])
    groups = dict(gpu_check.plan(gpu_check.parse_args([]), gpus=1))
    assert groups["data"]["device_decode"] and "device_decode" not in dict(
        gpu_check.plan(gpu_check.parse_args(["--cpu-smoke"]), gpus=1))["data"]
