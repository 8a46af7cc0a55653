"""The launch API without a cluster: sweep expansion, stable run dirs, executor settings from config.launch, the
variables the Slurm script reads, and one real run through submitit's local executor (2 tasks, the same path)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from alignclip.config import ConfigError, load_config
from alignclip.launch import (TrainJob, grid, make_executor, make_run, make_sweep, parse_axis, point_name, shell_env,
                              tasks_per_node)
from launch_helpers import REPO_ROOT, base_config, job_env, logged_steps, tiny_overrides, trainer_state, unavailable


def test_grid_is_the_cartesian_product_in_a_stable_order():
    points = grid({"train.lr": [1e-3, 5e-4], "loss.imsep_sides": ["image", "both"], "model.grad_checkpointing": [True]})
    assert points == [
        ["train.lr=0.001", "loss.imsep_sides=image", "model.grad_checkpointing=true"],
        ["train.lr=0.001", "loss.imsep_sides=both", "model.grad_checkpointing=true"],
        ["train.lr=0.0005", "loss.imsep_sides=image", "model.grad_checkpointing=true"],
        ["train.lr=0.0005", "loss.imsep_sides=both", "model.grad_checkpointing=true"],
    ]
    assert parse_axis("train.lr=1e-3,5e-4") == ("train.lr", ["1e-3", "5e-4"])
    with pytest.raises(ConfigError, match="key=value1,value2"):
        parse_axis("train.lr")
    with pytest.raises(ConfigError, match="'train.lr' has no values"):
        grid({"train.lr": []})


def test_sweep_points_get_distinct_stable_run_dirs_named_by_their_overrides(tmp_path):
    base = ["output_dir=" + str(tmp_path), "name=sw"]
    points = grid({"train.lr": ["1e-3", "5e-4"], "loss.imsep_weight": ["0.5"]})
    root, runs = make_sweep(base_config(tmp_path), points, base)
    assert root == tmp_path / "sw"
    assert [r.run_dir for r in runs] == [root / "lr=1e-3,imsep_weight=0.5", root / "lr=5e-4,imsep_weight=0.5"]
    again = make_sweep(base_config(tmp_path), points, base)[1]
    assert [r.overrides for r in again] == [r.overrides for r in runs]  # a resubmission lands in the same dirs
    assert runs[1].config.optim.lr == 5e-4 and runs[1].config.run_dir == str(root / "lr=5e-4,imsep_weight=0.5")
    assert point_name(["data.train=/a/{0..9}.tar"]) == "train=_a__0..9_.tar"


def test_sweep_rejects_points_that_cannot_differ_inside_one_array_and_bad_keys_before_submitting(tmp_path):
    with pytest.raises(ConfigError, match="launch.nodes=2"):
        make_sweep(base_config(tmp_path), [["launch.nodes=2"]], [f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="same run directory"):
        make_sweep(base_config(tmp_path), [["train.lr=1"], ["train.lr=1"]], [f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="train.lrr"):
        make_sweep(base_config(tmp_path), [["train.lrr=1"]], [f"output_dir={tmp_path}"])


def test_run_dir_is_made_absolute_at_submission(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = make_run(base_config(tmp_path), ["output_dir=relative", "name=exp"])
    assert run.run_dir == tmp_path / "relative" / "exp"
    assert run.overrides[-1] == f"run_dir={tmp_path / 'relative' / 'exp'}"
    assert Path(run.config_path).is_absolute()


def test_slurm_executor_settings_come_from_config_launch(tmp_path):
    from slurm_cluster import SlurmUnavailable, ensure_installed

    try:  # submitit's Slurm executor looks for srun; this test may run before test_launch_slurm installs it
        ensure_installed()
    except SlurmUnavailable as err:
        unavailable(f"Slurm's commands are missing: {err}")
    config = load_config(base_config(tmp_path), ["launch.nodes=4", "launch.gpus_per_node=8", "launch.cpus_per_task=12",
                                                 "launch.timeout_min=90", "launch.partition=h100",
                                                 "launch.signal_lead_s=180", "launch.mem_gb=500"])
    script = make_executor(config, tmp_path, "slurm")._make_submission_file_text("python -m x", "1")
    for line in ("--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=12", "--time=90",
                 "--partition=h100", "--signal=USR1@180", "--requeue", "--mem=500GB", "--open-mode=append"):
        assert f"#SBATCH {line}\n" in script, (line, script)
    assert "source " in script and "slurm/env.sh" in script  # the cluster env file
    cpu = load_config(base_config(tmp_path), ["launch.gpus_per_node=0", "launch.tasks_per_node=2"])
    assert tasks_per_node(cpu) == 2
    cpu_script = make_executor(cpu, tmp_path, "slurm")._make_submission_file_text("python -m x", "1")
    assert "gpus" not in cpu_script and "#SBATCH --ntasks-per-node=2\n" in cpu_script


def test_shell_env_gives_the_script_its_run_dir_requeue_code_and_a_port_seeded_by_the_job(tmp_path):
    from alignclip.training.preemption import REQUEUE_EXIT_CODE

    text = shell_env(base_config(tmp_path), [f"output_dir={tmp_path}", "name=job"], {"SLURM_JOB_ID": "4242"})
    values = dict(line.split("=", 1) for line in text.splitlines())
    assert values["RUN_DIR"] == str(tmp_path / "job")
    assert values["REQUEUE_EXIT_CODE"] == str(REQUEUE_EXIT_CODE)
    other = shell_env(base_config(tmp_path), [f"output_dir={tmp_path}"], {"SLURM_JOB_ID": "4243"})
    assert dict(line.split("=", 1) for line in other.splitlines())["MASTER_PORT"] != values["MASTER_PORT"]


def test_train_job_survives_pickling_with_its_run(tmp_path):
    import cloudpickle

    job = TrainJob("/abs/config.yaml", ["train.lr=1", "run_dir=/x"], max_requeues=3)
    clone = cloudpickle.loads(cloudpickle.dumps(job))
    assert (clone.config_path, clone.overrides, clone.max_requeues) == (job.config_path, job.overrides, 3)


def test_train_job_turns_a_trainer_exit_into_an_error_submitit_can_record(tmp_path):
    job = TrainJob(base_config(tmp_path), ["train.lrr=1"], max_requeues=0)
    with pytest.raises(RuntimeError, match="exited with code 2"):  # a config error, before torch loads
        job()


@pytest.mark.heavy
def test_local_executor_runs_a_two_point_sweep_of_two_task_runs_through_tools_sweep(tmp_path, monkeypatch):
    """The same job path without Slurm: tools/sweep.py --executor local --wait, each point 2 ranks (submitit's
    local variables -> setup_distributed_env), each in its own run dir."""
    monkeypatch.syspath_prepend(str(REPO_ROOT / "tools"))
    from sweep import main as sweep_main

    for key, value in job_env().items():
        monkeypatch.setenv(key, value)
    for key in [k for k in os.environ if k.startswith(("SLURM_", "SUBMITIT_"))]:
        monkeypatch.delenv(key)
    steps = 3
    overrides = tiny_overrides(tmp_path / "data", **{"train.max_steps": steps, "output_dir": str(tmp_path / "runs"),
                                                     "name": "local", "launch.tasks_per_node": 2})
    code = sweep_main(["--config", base_config(tmp_path), "--executor", "local", "--wait",
                       "--grid", "train.lr=1e-3,2e-3", *overrides])
    assert code == 0
    for point, lr in (("lr=1e-3", "0.001"), ("lr=2e-3", "0.002")):
        run_dir = tmp_path / "runs" / "local" / point
        assert trainer_state(run_dir)["step"] == steps and trainer_state(run_dir)["world_size"] == 2
        assert "world 2 (submitit)" in (run_dir / "train.log").read_text()  # ranks from submitit's variables
        assert logged_steps(run_dir) == list(range(1, steps + 1))
        assert f"lr: {lr}" in (run_dir / "config.yaml").read_text()
    assert (tmp_path / "runs" / "local" / "sweep.json").exists()
