"""The Slurm launch path against a real Slurm: slurm/pretrain_*.sh (which submits itself with the launch section's
resources), preemption by every signal route + requeue + resume, submitit sweeps, and a two-node job across
network namespaces. Every job reads its data with the recipes' real loader (``data.workers=2``): Slurm signals the
DataLoader workers too.

The fixtures start throw-away clusters (tests/helpers/slurm_cluster.py: installs Debian's packages when root and missing,
starts munged/slurmctld/slurmd, stops exactly what it started). Without root or Slurm the tests skip with the
reason; under CI=true they fail instead. Every job trains a tiny AlignCLIP with the real trainer (2 CPU tasks).
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT
from tests.helpers.launch import (base_config, final_weights, job_env, job_overrides, logged_steps,
                                  max_weight_difference, script_config_args, trainer_state, unavailable)
from tests.helpers.slurm_cluster import LocalSlurm, SlurmUnavailable, TwoNodeSlurm

pytestmark = [pytest.mark.heavy, pytest.mark.slurm]

SCRIPT = str(REPO_ROOT / "slurm" / "pretrain_alignclip.sh")
STEPS = 16  # long enough to signal mid-run (after step 3), short enough for the test budget
JOB_TIMEOUT_S = 900  # a hang guard only: on a loaded 2-core machine one requeued job takes ~7 minutes
# the recipes' loader, with worker processes that receive Slurm's signals too (2 ranks x 2 workers: 4 shards)
WORKERS = {"data.workers": 2, "data.generated.num_shards": 4, "data.generated.samples_per_shard": 16}


def _start(cluster):
    try:
        started = time.monotonic()
        cluster.start()
        return time.monotonic() - started
    except SlurmUnavailable as err:
        unavailable(f"cannot start a Slurm cluster here: {err}")


def _assert_stopped_cleanly(cluster) -> None:
    daemons = list(cluster.procs)
    cluster.stop()
    assert all(proc.poll() is not None for _, proc in daemons), [n for n, p in daemons if p.poll() is None]
    assert not cluster.root.exists(), f"{cluster.root} left behind"


@pytest.fixture(scope="module")
def slurm():
    cluster = LocalSlurm(cpus=4)  # room for two 1-task sweep points side by side
    _start(cluster)
    yield cluster
    _assert_stopped_cleanly(cluster)


@pytest.fixture(scope="module")
def two_node():
    cluster = TwoNodeSlurm(cpus_per_node=1)
    seconds = _start(cluster)
    cluster.setup_seconds = seconds
    yield cluster
    started = time.monotonic()
    _assert_stopped_cleanly(cluster)
    teardown = time.monotonic() - started
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "alclip-" not in namespaces, f"namespaces left behind: {namespaces}"
    assert not Path("/sys/class/net", TwoNodeSlurm.BRIDGE).exists(), "bridge left behind"
    print(f"two-node cluster: set-up {seconds:.1f} s, tear-down {teardown:.1f} s")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """One folder for the module: the generated dataset is rendered once and shared by every job."""
    return tmp_path_factory.mktemp("launch")


def _log(run_dir: Path, job_id: int) -> str:
    """The job's output as the script appends it into the run dir (or sbatch's own file, if it died earlier)."""
    for path in (run_dir / "logs" / f"slurm-{job_id}.out", *run_dir.parent.glob(f"*-{job_id}.out")):
        if path.exists():
            return path.read_text(errors="replace")
    return ""


def _submit(cluster, work: Path, name: str, *overrides: str, steps: int = STEPS) -> tuple[int, Path]:
    """``slurm/pretrain_alignclip.sh --parsable key=value ...``: the script submits itself (resources from the
    launch.* overrides: 2 CPU tasks on one node) and prints the job id."""
    run_dir = work / name
    args = [*script_config_args(work), "--parsable",
            *job_overrides(work / "data", run_dir, **{"train.max_steps": steps, **WORKERS}), *overrides]
    done = subprocess.run(["bash", SCRIPT, *args], env={**cluster.env, **job_env()}, cwd=work, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, f"submission failed ({done.returncode}): {done.stderr[-3000:]}"
    return int(done.stdout.strip().splitlines()[-1].split(";")[0]), run_dir


@pytest.fixture(scope="module")
def straight_run(slurm, work) -> tuple[int, Path]:
    """``slurm/pretrain_alignclip.sh`` with 2 tasks on one CPU node, run to completion."""
    job_id, run_dir = _submit(slurm, work, "straight")
    state = slurm.wait_job(job_id, JOB_TIMEOUT_S)
    assert state == "COMPLETED", f"job ended {state}:\n{_log(run_dir, job_id)[-4000:]}"
    return job_id, run_dir


def test_sbatch_two_cpu_tasks_train_to_completion_with_checkpoints_tensorboard_and_both_ranks_logged(
        slurm, straight_run, work):
    job_id, run_dir = straight_run
    assert slurm.job_field(job_id, "ExitCode") == "0:0"
    assert trainer_state(run_dir)["step"] == STEPS
    assert trainer_state(run_dir)["world_size"] == 2
    assert logged_steps(run_dir) == list(range(1, STEPS + 1))  # TensorBoard events, one per step
    log = _log(run_dir, job_id)  # the job's output, appended into the run dir by the script
    assert "0: [pretrain] rank 0/2 on" in log and "1: [pretrain] rank 1/2 on" in log
    assert "world 2 (slurm)" in (run_dir / "train.log").read_text()
    assert list(work.glob(f"*-{job_id}.out"))  # sbatch's own --output (%x-%j.out), in the submission dir
    # the resources came from the launch section (no #SBATCH line, no sbatch flag given)
    assert slurm.job_field(job_id, "NumTasks") == "2" and slurm.job_field(job_id, "TimeLimit") == "00:10:00"
    assert slurm.job_field(job_id, "Requeue") == "1"
    assert (run_dir / "config.yaml").exists()


# How each preemption route reaches the trainers: scancel's flags, and what the log shows on the way.
ROUTES = {
    "TERM to the step": (["--signal=TERM"], ""),
    "USR1 to the step": (["--signal=USR1"], ""),
    "USR1 to batch shell and step (--full)": (["--full", "--signal=USR1"], "batch shell received SIGUSR1"),
    "TERM to the batch shell only (-b)": (["-b", "--signal=TERM"], "batch shell received SIGTERM"),
}


@pytest.mark.parametrize("route", list(ROUTES))
def test_preemption_signal_mid_run_saves_requeues_and_resumes_to_the_same_weights(slurm, straight_run, work, route):
    flags, forwarded = ROUTES[route]
    job_id, run_dir = _submit(slurm, work, "preempted_" + re.sub(r"\W+", "_", route))
    deadline = time.monotonic() + JOB_TIMEOUT_S
    train_log = run_dir / "train.log"
    while not (train_log.exists() and re.search(r"INFO step [3-9] ", train_log.read_text())):
        assert time.monotonic() < deadline and slurm.job_field(job_id, "JobState") in ("PENDING", "RUNNING"), \
            _log(run_dir, job_id)[-3000:]
        time.sleep(0.2)
    subprocess.run(["scancel", *flags, str(job_id)], env=slurm.env, check=True, timeout=30)
    state = slurm.wait_job(job_id, JOB_TIMEOUT_S)
    log = _log(run_dir, job_id)
    assert state == "COMPLETED", f"job ended {state}:\n{log[-4000:]}"
    assert slurm.job_field(job_id, "Restarts") == "1", log[-4000:]
    assert "requeueing job" in log and "(restart 1)" in log
    assert forwarded in log
    assert "killed by signal" not in log and "Traceback" not in log, log[-4000:]

    preempted = re.search(r"preempted \((\w+) received by this rank\): saved .*step_(\d+) at step (\d+)",
                          train_log.read_text())
    assert preempted, train_log.read_text()[-3000:]
    assert preempted.group(1) == "SIG" + flags[-1].split("=")[1]  # the trainer saw the signal that was sent
    stopped_at = int(preempted.group(3))
    assert 3 <= stopped_at < STEPS  # stopped mid-run, at a step boundary, with a checkpoint of that step
    assert f"resumed from {run_dir}/checkpoints/step_{stopped_at:08d} at step {stopped_at}" in train_log.read_text()
    assert not list((run_dir / "checkpoints").glob("*.tmp"))
    state = trainer_state(run_dir)
    assert state["step"] == STEPS and state["samples_seen"] == STEPS * 16  # no step lost or repeated
    steps = logged_steps(run_dir)
    assert sorted(set(steps)) == list(range(1, STEPS + 1)), steps
    # Exact resume: the requeued job ends where the uninterrupted one did.
    difference = max_weight_difference(final_weights(run_dir), final_weights(straight_run[1]))
    print(f"{route}: stopped at step {stopped_at}; resumed final weights vs uninterrupted: max |diff| = "
          f"{difference:.3g}")
    assert difference <= 1e-6


def test_scontrol_and_our_node_list_expansion_agree(slurm, monkeypatch):
    """Inside a job, host lists come from Slurm itself; where this Slurm refuses a form (22.05 and suffixed
    ranges), the fallback parser follows Slurm's semantics: compare both on what scontrol accepts."""
    from alignclip.distributed.env import expand_nodelist

    monkeypatch.setenv("SLURM_CONF", slurm.env["SLURM_CONF"])
    path = os.environ["PATH"]
    for nodelist in ("gpu[08-10,12],cpu1", "x[1-2]y[3-4]", "node-001-ib,node-002-ib", "a[7-9]"):
        expected = subprocess.run(["scontrol", "show", "hostnames", nodelist], env=slurm.env, capture_output=True,
                                  text=True, timeout=30).stdout.split()
        assert expand_nodelist(nodelist) == expected
        monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: the fallback parser
        assert expand_nodelist(nodelist) == expected
        monkeypatch.setenv("PATH", path)


def test_submitit_sweep_is_one_array_each_point_in_its_own_run_dir_and_a_preempted_point_resumes(
        slurm, work, monkeypatch):
    """Two points through submitit's Slurm executor; point 0 gets USR1 mid-run: the trainer saves, TrainJob
    requeues the array task (no save in a signal handler), and the requeued task finishes from the checkpoint."""
    from alignclip.launch import grid, submit_sweep, wait_slurm

    for key, value in {**slurm.env, **job_env()}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(work)
    overrides = job_overrides(work / "data", **{"train.max_steps": STEPS, "launch.tasks_per_node": 1, **WORKERS,
                                                 "output_dir": str(work / "sweeps"), "name": "lr"})
    submitted = submit_sweep(base_config(work), grid({"optim.lr": ["1e-3", "2e-3"]}), overrides, executor="slurm")
    array_ids = {s.job_id.split("_")[0] for s in submitted}
    assert len(array_ids) == 1 and [s.job_id.split("_")[1] for s in submitted] == ["0", "1"]  # one job array
    run_dirs = [s.run.run_dir for s in submitted]
    assert run_dirs == [work / "sweeps" / "lr" / "lr=1e-3", work / "sweeps" / "lr" / "lr=2e-3"]

    train_log = run_dirs[0] / "train.log"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (train_log.exists() and re.search(r"INFO step [3-9] ", train_log.read_text())):
        assert time.monotonic() < deadline, "sweep point 0 never reached step 3"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", submitted[0].job_id], check=True, timeout=30)
    wait_slurm([s.job_id for s in submitted], JOB_TIMEOUT_S, poll_s=0.5)

    for run_dir, lr in zip(run_dirs, ("0.001", "0.002")):
        assert trainer_state(run_dir).get("step") == STEPS, sorted(run_dir.rglob("*"))
        assert f"lr: {lr}" in (run_dir / "config.yaml").read_text()
    assert "preempted (" in train_log.read_text()
    assert sorted(set(logged_steps(run_dirs[0]))) == list(range(1, STEPS + 1))
    assert slurm.job_field(submitted[0].job_id, "Restarts") == "1"
    assert slurm.job_field(submitted[1].job_id, "Restarts") == "0"
    assert (work / "sweeps" / "lr" / "sweep.json").exists()


def test_two_node_job_puts_one_rank_per_node_and_matches_the_one_node_run(two_node, straight_run, work):
    # gloo must bootstrap over the namespaces' link: name the interface every node has there
    env = {**two_node.env, **job_env(), "GLOO_SOCKET_IFNAME": TwoNodeSlurm.IFNAME}
    run_dir = work / "two_node"
    args = [*script_config_args(work), "--parsable",
            *job_overrides(work / "data", run_dir, **{"train.max_steps": STEPS, **WORKERS, "launch.nodes": 2,
                                                       "launch.tasks_per_node": 1})]
    done = subprocess.run(["bash", SCRIPT, *args], env=env, cwd=work, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    job_id = int(done.stdout.strip().splitlines()[-1].split(";")[0])
    state = two_node.wait_job(job_id, JOB_TIMEOUT_S)
    log = _log(run_dir, job_id)
    assert state == "COMPLETED", f"job ended {state}:\n{log[-4000:]}"
    assert "0: [pretrain] rank 0/2 on node1" in log and "1: [pretrain] rank 1/2 on node2" in log
    assert "master node1:" in log
    assert trainer_state(run_dir)["step"] == STEPS
    difference = max_weight_difference(final_weights(run_dir), final_weights(straight_run[1]))
    assert difference <= 1e-6, f"two nodes vs one node: weights differ by {difference:.3g}"
    print(f"two-node cluster set-up: {two_node.setup_seconds:.1f} s")
