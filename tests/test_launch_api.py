"""The launch API without a cluster: sweep expansion, stable run dirs, executor settings from config.launch, the
variables the Slurm script reads, and one real run through submitit's local executor (2 tasks, the same path)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from alignclip.config import ConfigError, load_config
from alignclip.launch import (TrainJob, grid, make_executor, make_run, make_sweep, parse_axis, point_name, shell_env,
                              tasks_per_node)
from tests.helpers import REPO_ROOT
from tests.helpers.launch import base_config, job_env, job_overrides, logged_steps, trainer_state, unavailable
from tests.helpers.tools import command


def test_grid_is_the_cartesian_product_in_a_stable_order():
    points = grid({"optim.lr": [1e-3, 5e-4], "loss.imsep_sides": ["image", "both"], "model.grad_checkpointing": [True]})
    assert points == [
        ["optim.lr=0.001", "loss.imsep_sides=image", "model.grad_checkpointing=true"],
        ["optim.lr=0.001", "loss.imsep_sides=both", "model.grad_checkpointing=true"],
        ["optim.lr=0.0005", "loss.imsep_sides=image", "model.grad_checkpointing=true"],
        ["optim.lr=0.0005", "loss.imsep_sides=both", "model.grad_checkpointing=true"],
    ]
    assert parse_axis("optim.lr=1e-3,5e-4") == ("optim.lr", ["1e-3", "5e-4"])
    with pytest.raises(ConfigError, match="key=value1,value2"):
        parse_axis("optim.lr")
    with pytest.raises(ConfigError, match="'optim.lr' has no values"):
        grid({"optim.lr": []})


def test_sweep_points_get_distinct_stable_run_dirs_named_by_their_overrides(tmp_path):
    base = ["output_dir=" + str(tmp_path), "name=sw"]
    points = grid({"optim.lr": ["1e-3", "5e-4"], "loss.imsep_weight": ["0.5"]})
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
        make_sweep(base_config(tmp_path), [["optim.lr=1"], ["optim.lr=1"]], [f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="train.lrr"):
        make_sweep(base_config(tmp_path), [["train.lrr=1"]], [f"output_dir={tmp_path}"])


def test_run_dir_is_made_absolute_at_submission(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = make_run(base_config(tmp_path), ["output_dir=relative", "name=exp"])
    assert run.run_dir == tmp_path / "relative" / "exp"
    assert run.overrides[-1] == f"run_dir={tmp_path / 'relative' / 'exp'}"
    assert Path(run.config_path).is_absolute()


def test_slurm_executor_settings_come_from_config_launch(tmp_path):
    from tests.helpers.slurm_cluster import SlurmUnavailable, ensure_installed

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

    job = TrainJob("/abs/config.yaml", ["optim.lr=1", "run_dir=/x"], max_requeues=3)
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
    sweep_main = command("sweep")

    for key, value in job_env().items():
        monkeypatch.setenv(key, value)
    for key in [k for k in os.environ if k.startswith(("SLURM_", "SUBMITIT_"))]:
        monkeypatch.delenv(key)
    steps = 3
    overrides = job_overrides(tmp_path / "data", **{"train.max_steps": steps, "output_dir": str(tmp_path / "runs"),
                                                     "name": "local", "launch.tasks_per_node": 2})
    code = sweep_main(["--config", base_config(tmp_path), "--executor", "local", "--wait",
                       "--grid", "optim.lr=1e-3,2e-3", *overrides])
    assert code == 0
    for point, lr in (("lr=1e-3", "0.001"), ("lr=2e-3", "0.002")):
        run_dir = tmp_path / "runs" / "local" / point
        assert trainer_state(run_dir)["step"] == steps and trainer_state(run_dir)["world_size"] == 2
        assert "world 2 (submitit)" in (run_dir / "train.log").read_text()  # ranks from submitit's variables
        assert logged_steps(run_dir) == list(range(1, steps + 1))
        assert f"lr: {lr}" in (run_dir / "config.yaml").read_text()
    assert (tmp_path / "runs" / "local" / "sweep.json").exists()


# ------------------------------------------------------------------- one launch path (slurm/pretrain.sh)
SCRIPT = REPO_ROOT / "slurm" / "pretrain_alignclip.sh"


def test_sbatch_flags_come_from_the_launch_section():
    from alignclip.launch import sbatch_args

    config = load_config("experiment/cc12m_alignclip", ["launch.nodes=4", "launch.timeout_min=90",
                                                        "launch.partition=h100", "launch.mem_gb=200"])
    flags = sbatch_args(config)
    assert flags[:9] == ["--job-name=cc12m_alignclip", "--nodes=4", "--ntasks-per-node=8", "--cpus-per-task=12",
                         "--time=90", "--requeue", "--signal=USR1@120", "--open-mode=append", "--output=%x-%j.out"]
    assert set(flags[9:]) == {"--gpus-per-node=8", "--mem=200G", "--partition=h100"}
    cpu = sbatch_args(load_config("experiment/cc12m_alignclip", ["launch.gpus_per_node=0", "launch.tasks_per_node=2"]))
    assert "--ntasks-per-node=2" in cpu and not any(f.startswith("--gpus-per-node") for f in cpu)


def test_a_time_limit_or_any_launch_key_does_not_change_the_run_hash():
    from alignclip.config import config_hash

    base = load_config("experiment/cc12m_alignclip")
    for override in ("launch.timeout_min=5", "launch.nodes=16", "launch.partition=other", "launch.max_requeues=1"):
        assert config_hash(load_config("experiment/cc12m_alignclip", [override])) == config_hash(base), override
    assert config_hash(load_config("experiment/cc12m_alignclip", ["optim.lr=1e-5"])) != config_hash(base)


def test_node_lists_with_suffixes_and_several_ranges_follow_slurm_semantics(monkeypatch):
    """Without scontrol (outside a job), our parser; with it, Slurm's (test_launch_slurm.py compares the two)."""
    from alignclip.distributed.env import expand_nodelist

    monkeypatch.setenv("PATH", "/nonexistent")
    assert expand_nodelist("node-[001-002]-ib") == ["node-001-ib", "node-002-ib"]  # was [node-001, node-002, -ib]
    assert expand_nodelist("gpu[08-10,12]-ib,cpu1") == ["gpu08-ib", "gpu09-ib", "gpu10-ib", "gpu12-ib", "cpu1"]
    assert expand_nodelist("rack[1-2]-n[01-02]") == ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]
    assert expand_nodelist("node-001-ib,node-002-ib") == ["node-001-ib", "node-002-ib"]  # Slurm 22.05's form
    assert expand_nodelist("node7") == ["node7"] and expand_nodelist("") == []
    with pytest.raises(ValueError, match="bad range"):
        expand_nodelist("node[a-b]")


def test_requeue_outside_a_job_does_nothing_and_says_so(capsys):
    from alignclip.launch import requeue_job

    assert requeue_job(3, environ={}) is False
    assert "not inside a Slurm job" in capsys.readouterr().out
    assert requeue_job(3, environ={"SLURM_JOB_ID": "5", "SLURM_RESTART_COUNT": "3"}) is False
    assert "after 3 requeues" in capsys.readouterr().out


def test_pretrain_script_refuses_a_bad_override_before_submitting_and_needs_a_config(tmp_path):
    import subprocess

    env = {**os.environ, **job_env(), "PATH": os.environ["PATH"]}
    env.pop("SLURM_JOB_ID", None)
    done = subprocess.run(["bash", str(SCRIPT), "train.lrr=1"], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "train.lrr" in done.stderr, done.stderr
    done = subprocess.run(["bash", str(REPO_ROOT / "slurm" / "pretrain.sh"), "optim.lr=1"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--config FILE is required" in done.stderr
