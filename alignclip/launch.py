"""Launch training runs on Slurm (or locally) through submitit: one run, or a sweep as one job array.

Every run trains through the same entry point as ``sbatch slurm/pretrain_*.sh`` (``alignclip.train.main``) and
gets its ranks from the same function (``alignclip.distributed.env.setup_distributed_env``, called by the trainer),
so a submitit job and an sbatch job differ only in who wrote the batch script.

Run directories are stable: ``run_dir`` is resolved to an absolute path at submission and passed as an override,
and a sweep point's directory is named by its overrides (``<output_dir>/<name>/<key>=<value>,...``). A requeued or
resubmitted job therefore finds its own checkpoints and resumes.

Preemption and time limits (never a collective save from a signal handler): Slurm sends ``SIGUSR1`` to every task
``launch.signal_lead_s`` before the limit (and ``scancel --signal=USR1`` does the same by hand). The trainer's own
handler only sets a flag; all ranks agree on it at the next step, save a checkpoint together, and the trainer exits
with ``REQUEUE_EXIT_CODE``. ``TrainJob`` catches that exit and global rank 0 runs ``scontrol requeue`` (at most
``launch.max_requeues`` times); the requeued job resumes from the checkpoint. submitit's own preemption signal
(``SIGUSR2``, which its handler would answer by checkpointing from rank 0 alone) is forwarded to ``SIGUSR1`` so it
takes the same path.

One source of truth for resources: ``slurm/pretrain.sh`` submits itself with the flags
``python -m alignclip.launch sbatch-args --config C key=value ...`` derives from the ``launch`` section (the same
fields the submitit executor reads), and ``python -m alignclip.launch shell-env ...`` prints the variables its
batch shell needs (run dir, master port, env file). One requeue routine: ``requeue_job`` (``python -m
alignclip.launch requeue`` in the batch shell, ``TrainJob`` under submitit).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

from alignclip.config import (Config, ConfigError, check_repeated_overrides, load_config, override_key,
                              run_dir_of)
from alignclip.errors import run_command
from alignclip.fs import atomic_write
from alignclip.paths import SLURM_DIR

DEFAULT_ENV_FILE = SLURM_DIR / "env.sh"  # slurm/env.sh of the checkout, or the copy shipped in the wheel
PROG = "python -m alignclip.launch"
# How long a task that asked for a requeue waits for Slurm to kill it before giving up (Slurm's KillWait is
# usually 30 s; a job that is still alive after this was not requeued).
_REQUEUE_GRACE_S = 300


# ----------------------------------------------------------------------------------------------- runs
def tasks_per_node(config: Config) -> int:
    """One task per GPU; on CPU-only nodes (``gpus_per_node=0``) ``launch.tasks_per_node`` tasks."""
    launch = config.launch
    if launch.tasks_per_node > 0:
        return launch.tasks_per_node
    return max(launch.gpus_per_node, 1)


def env_file_of(config: Config) -> Path:
    return Path(config.launch.env_file) if config.launch.env_file else DEFAULT_ENV_FILE


@dataclass
class RunSpec:
    """One training run: a config file, its overrides (including the absolute ``run_dir``) and that run dir."""

    config_path: str
    overrides: list[str]
    run_dir: Path
    config: Config = field(repr=False, default=None)  # type: ignore[assignment]


def _absolute_config_path(config_path: str | Path) -> str:
    from alignclip.config import resolve_config_path

    return str(resolve_config_path(config_path).resolve())


def make_run(config_path: str | Path, overrides: Sequence[str] = (), run_dir: str | Path | None = None) -> RunSpec:
    """Resolve and validate a run now (a config error fails the submission, not the job an hour later)."""
    if run_dir is None:  # a single run: the user's command line (sweeps check base and points in make_sweep)
        check_repeated_overrides(overrides)
    overrides = [o for o in overrides if not o.startswith("run_dir=")] if run_dir is not None else list(overrides)
    config = load_config(config_path, overrides)
    resolved = Path(run_dir if run_dir is not None else run_dir_of(config)).absolute()
    overrides = overrides + [f"run_dir={resolved}"]
    config = load_config(config_path, overrides)
    return RunSpec(_absolute_config_path(config_path), overrides, resolved, config)


# --------------------------------------------------------------------------------------------- sweeps
def grid(axes: Mapping[str, Sequence[object]]) -> list[list[str]]:
    """The cartesian product of ``{key: [values]}`` as override lists, in a stable order (last key fastest)."""
    keys = list(axes)
    for key in keys:
        if not axes[key]:
            raise ConfigError(f"sweep axis '{key}' has no values")
    return [[f"{k}={_format(v)}" for k, v in zip(keys, values)] for values in itertools.product(*axes.values())]


def parse_axis(text: str) -> tuple[str, list[str]]:
    """``optim.lr=1e-3,5e-4`` -> ("optim.lr", ["1e-3", "5e-4"]) (one sweep axis from the command line)."""
    key, sep, values = text.partition("=")
    if not sep or not key or not values:
        raise ConfigError(f"sweep axis '{text}' is not of the form key=value1,value2,...")
    return key, [v for v in values.split(",") if v != ""]


def _format(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def point_name(overrides: Sequence[str]) -> str:
    """A directory name that identifies a sweep point by its overrides: ``optim.lr=0.001`` -> ``lr=0.001``."""
    parts = []
    for item in overrides:
        key, _, value = item.partition("=")
        parts.append(f"{key.rsplit('.', 1)[-1]}={value}")
    name = ",".join(parts) or "base"
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", name)[:200]


def make_sweep(config_path: str | Path, points: Sequence[Sequence[str]], base_overrides: Sequence[str] = (),
               sweep_dir: str | Path | None = None) -> tuple[Path, list[RunSpec]]:
    """One RunSpec per point, each in ``<sweep_dir>/<point_name>`` (default sweep dir: the base run dir)."""
    if not points:
        raise ConfigError("a sweep needs at least one point")
    check_repeated_overrides(base_overrides)
    for point in points:
        check_repeated_overrides(point)
    base = load_config(config_path, list(base_overrides))
    root = Path(sweep_dir if sweep_dir is not None else run_dir_of(base)).absolute()
    runs, names = [], set()
    for point in points:
        for item in point:
            if item.startswith(("launch.", "run_dir=", "name=", "output_dir=")):
                raise ConfigError(f"sweep point override '{item}': a sweep is one job array with one run dir "
                                  "per point, so launch.*, run_dir, name and output_dir belong to the base")
        name = point_name(point)
        if name in names:
            raise ConfigError(f"two sweep points map to the same run directory '{name}'")
        names.add(name)
        # a point's value replaces the base's for the same key, so the job's own command line (which the trainer
        # checks for repeated keys) names each key once
        keys = {override_key(item) for item in point}
        base_kept = [item for item in base_overrides if override_key(item) not in keys]
        runs.append(make_run(config_path, base_kept + list(point), run_dir=root / name))
    return root, runs


# ------------------------------------------------------------------------------------------- the job
class TrainJob:
    """The callable submitit pickles: train one run in-process, and turn a preemption exit into a requeue."""

    def __init__(self, config_path: str, overrides: Sequence[str], max_requeues: int):
        self.config_path = config_path
        self.overrides = list(overrides)
        self.max_requeues = max_requeues

    def __call__(self) -> str:
        from alignclip.train import main as train_main
        from alignclip.training.preemption import REQUEUE_EXIT_CODE

        # submitit's preemption signal takes the trainer's path: flag, agree, save together, exit 124.
        signal.signal(signal.SIGUSR2, lambda signum, frame: os.kill(os.getpid(), signal.SIGUSR1))
        code = train_main(["--config", self.config_path, *self.overrides])
        if code != 0:
            if code == REQUEUE_EXIT_CODE:
                self._requeue()  # returns only when the job is not requeued
            # an Exception, so that submitit records the failure as the job's result
            raise RuntimeError(f"python -m alignclip.train exited with code {code} "
                               f"(config {self.config_path}, overrides {self.overrides})")
        return str(run_dir_of(load_config(self.config_path, self.overrides)))

    def _requeue(self) -> None:
        """Rank 0 requeues the Slurm job; every rank then waits to be killed (so submitit records no result)."""
        if not os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
            return  # local executor: nothing to requeue; resubmitting the same run resumes it
        if os.environ.get("SLURM_PROCID", "0") == "0":
            requeued = requeue_job(self.max_requeues)
        else:
            requeued = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) < self.max_requeues
        if requeued:
            time.sleep(_REQUEUE_GRACE_S)

    def __repr__(self) -> str:
        return f"TrainJob({self.config_path!r}, {self.overrides!r})"


def requeue_job(max_requeues: int, environ: Mapping[str, str] = os.environ) -> bool:
    """Requeue this Slurm job (or array task) after a preemption exit, unless it was requeued ``max_requeues``
    times already. True if requeued. The one requeue routine of both launch paths."""
    job_id = environ.get("SLURM_JOB_ID")
    if not job_id:
        print("[launch] not inside a Slurm job: nothing to requeue", flush=True)
        return False
    restarts = int(environ.get("SLURM_RESTART_COUNT", "0") or 0)
    if restarts >= max_requeues:
        print(f"[launch] preempted after {restarts} requeues (launch.max_requeues={max_requeues}): "
              "not requeueing", flush=True)
        return False
    array = environ.get("SLURM_ARRAY_JOB_ID"), environ.get("SLURM_ARRAY_TASK_ID")
    target = f"{array[0]}_{array[1]}" if all(array) else job_id
    print(f"[launch] checkpoint saved; requeueing job {target} (restart {restarts + 1})", flush=True)
    subprocess.run(["scontrol", "requeue", target], check=True, timeout=60)
    return True


def sbatch_args(config: Config, job_name: Optional[str] = None) -> list[str]:
    """``sbatch`` command-line flags for ``config.launch``: what ``#SBATCH`` lines would say, from the config.
    The signal goes to the job steps (the trainers) ``signal_lead_s`` before the time limit; the batch shell of
    slurm/pretrain.sh forwards whatever it receives itself."""
    launch = config.launch
    args = [f"--job-name={job_name or config.name}", f"--nodes={launch.nodes}",
            f"--ntasks-per-node={tasks_per_node(config)}", f"--cpus-per-task={launch.cpus_per_task}",
            f"--time={launch.timeout_min}", "--requeue", f"--signal=USR1@{launch.signal_lead_s}",
            "--open-mode=append", "--output=%x-%j.out"]
    if launch.gpus_per_node > 0:
        args.append(f"--gpus-per-node={launch.gpus_per_node}")
    if launch.mem_gb > 0:
        args.append(f"--mem={launch.mem_gb}G")
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(launch, key):
            args.append(f"--{key}={getattr(launch, key)}")
    return args


# ------------------------------------------------------------------------------------------ executors
def make_executor(config: Config, folder: str | Path, executor: Optional[str] = None, job_name: str = "alignclip"):
    """A submitit executor configured from ``config.launch`` (``executor`` overrides ``launch.executor``)."""
    import submitit

    launch = config.launch
    kind = executor or launch.executor
    ntasks = tasks_per_node(config)
    # the job unpickles TrainJob: it finds alignclip as the submitter did (installed, or through the PYTHONPATH
    # and working directory that sbatch and the local executor pass on), so nothing is added here
    if kind == "local":
        ex = submitit.LocalExecutor(folder=str(folder))
        ex.update_parameters(timeout_min=launch.timeout_min, tasks_per_node=ntasks, nodes=1,
                             gpus_per_node=launch.gpus_per_node)
        return ex
    if kind != "slurm":
        raise ConfigError(f"key 'launch.executor' is {kind!r}; expected 'slurm' or 'local'")
    ex = submitit.SlurmExecutor(folder=str(folder), max_num_timeout=launch.max_requeues)
    params: dict = dict(nodes=launch.nodes, ntasks_per_node=ntasks, cpus_per_task=launch.cpus_per_task,
                        time=launch.timeout_min, job_name=job_name, array_parallelism=launch.array_parallelism,
                        setup=[f"source {shlex.quote(str(env_file_of(config)))}"],
                        stderr_to_stdout=True,
                        # our signal, not submitit's USR2: the trainer's handler saves (see module docstring)
                        additional_parameters={"signal": f"USR1@{launch.signal_lead_s}", "requeue": True})
    if launch.gpus_per_node > 0:
        params["gpus_per_node"] = launch.gpus_per_node
    if launch.mem_gb > 0:
        params["mem"] = f"{launch.mem_gb}GB"
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(launch, key):
            params[key] = getattr(launch, key)
    ex.update_parameters(**params)
    return ex


@dataclass
class Submitted:
    run: RunSpec
    job: object  # submitit.Job

    @property
    def job_id(self) -> str:
        return str(self.job.job_id)


def submit(config_path: str | Path, overrides: Sequence[str] = (), executor: Optional[str] = None) -> Submitted:
    """Submit one run; submitit's files go to ``<run_dir>/submitit``."""
    run = make_run(config_path, overrides)
    ex = make_executor(run.config, run.run_dir / "submitit", executor, job_name=run.config.name)
    job = ex.submit(TrainJob(run.config_path, run.overrides, run.config.launch.max_requeues))
    _write_manifest(run.run_dir / "launch.json", [Submitted(run, job)])
    return Submitted(run, job)


def submit_sweep(config_path: str | Path, points: Sequence[Sequence[str]], base_overrides: Sequence[str] = (),
                 executor: Optional[str] = None, sweep_dir: str | Path | None = None) -> list[Submitted]:
    """Submit every point as one job array (executor settings from the base config's ``launch`` section).

    ``points`` is a list of override lists: ``grid({...})`` for a grid, or an explicit list. A manifest
    ``<sweep_dir>/sweep.json`` maps each point to its run dir and job id.
    """
    root, runs = make_sweep(config_path, points, base_overrides, sweep_dir)
    base = load_config(config_path, list(base_overrides))
    ex = make_executor(base, root / "submitit", executor, job_name=base.name)
    with ex.batch():
        jobs = [ex.submit(TrainJob(r.config_path, r.overrides, base.launch.max_requeues)) for r in runs]
    submitted = [Submitted(r, j) for r, j in zip(runs, jobs)]
    _write_manifest(root / "sweep.json", submitted)
    return submitted


def _write_manifest(path: Path, submitted: Iterable[Submitted]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [dict(job_id=s.job_id, run_dir=str(s.run.run_dir), config=s.run.config_path,
                    overrides=s.run.overrides) for s in submitted]
    atomic_write(path, json.dumps(records, indent=2) + "\n")


def wait_slurm(job_ids: Iterable[str], timeout_s: float, poll_s: float = 2.0) -> None:
    """Block until no job (or array task) of ``job_ids`` is queued or running, through ``squeue``.

    Works without accounting (submitit's own state tracking needs ``sacct``); the outcome of each run is then
    read from its run directory (checkpoints, ``latest``), which is the ground truth anyway.
    """
    ids = sorted({str(j).split("_")[0] for j in job_ids})
    deadline = time.monotonic() + timeout_s
    while True:
        out = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(ids)], capture_output=True, text=True,
                             timeout=30)
        if out.returncode == 0 and not out.stdout.strip():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"Slurm jobs {ids} still queued or running after {timeout_s:.0f} s:\n{out.stdout}")
        time.sleep(poll_s)


# --------------------------------------------------------------------------------------- shell helper
def shell_env(config_path: str | Path, overrides: Sequence[str], environ: Mapping[str, str] = os.environ) -> str:
    """``NAME=value`` lines (shell-quoted) for slurm/pretrain.sh: what a batch script cannot compute itself."""
    from alignclip.distributed.env import port_for_job
    from alignclip.training.preemption import REQUEUE_EXIT_CODE

    run = make_run(config_path, overrides)
    values = dict(RUN_DIR=run.run_dir, CONFIG_PATH=run.config_path, REQUEUE_EXIT_CODE=REQUEUE_EXIT_CODE,
                  MAX_REQUEUES=run.config.launch.max_requeues, ENV_FILE=env_file_of(run.config),
                  MASTER_PORT=port_for_job(environ.get("SLURM_JOB_ID", "0")))
    return "".join(f"{k}={shlex.quote(str(v))}\n" for k, v in values.items())


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("shell-env", "print the variables slurm/pretrain.sh sources"),
                       ("sbatch-args", "print the sbatch flags of the config's launch section, one per line"),
                       ("submit", "submit one run through submitit")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", "-c", required=True)
        p.add_argument("overrides", nargs="*")
        if name == "submit":
            p.add_argument("--executor", choices=("slurm", "local"), default=None)
    p = sub.add_parser("requeue", help="requeue this Slurm job after a preemption exit (exit 0 if requeued, 1 if not)")
    p.add_argument("--max-requeues", type=int, required=True)
    args = parser.parse_args(argv)
    if args.command == "requeue":
        return 0 if requeue_job(args.max_requeues) else 1
    return run_command(PROG, lambda: _run(args), errors=(ConfigError,))


def _run(args) -> None:
    if args.command == "shell-env":
        sys.stdout.write(shell_env(args.config, args.overrides))
    elif args.command == "sbatch-args":
        print("\n".join(sbatch_args(make_run(args.config, args.overrides).config)))
    else:
        s = submit(args.config, args.overrides, args.executor)
        print(f"submitted job {s.job_id}: run dir {s.run.run_dir}")


if __name__ == "__main__":
    raise SystemExit(main())
