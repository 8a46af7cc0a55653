"""Pretrain CLIP / SharedCLIP / AlignCLIP with DeepSpeed.

    python -m alignclip.train --config configs/experiment/NAME.yaml key=value ...
    torchrun --nproc-per-node 8 -m alignclip.train --config ...      # or under srun / submitit

Restarting the same command continues from the run directory's latest checkpoint. Exit codes: 0 finished,
124 (``alignclip.training.preemption.REQUEUE_EXIT_CODE``) stopped by a preemption signal after saving a checkpoint
(requeue me), 2 configuration error, no usable checkpoint in a run directory that has some, or a run directory
that cannot be written (read-only, full: one line, also in train.log), 1 any other failure.
"""

from __future__ import annotations

import atexit
import errno
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import NoReturn, Optional

from alignclip.config import parse_cli
from alignclip.errors import ConfigError, run_command
from alignclip.fs import UNWRITABLE_ERRNOS

PROG = "alignclip-train"


def main(argv: Optional[list[str]] = None) -> int:
    """The run's exit code; a config error, or no usable checkpoint in a run directory that has some
    (``CheckpointError``, a ``ConfigError``), is one line on stderr and 2."""
    return run_command(PROG, lambda: _train(argv), errors=(ConfigError,))  # any other error is a bug: traceback


def _train(argv: Optional[list[str]]) -> int:
    config, _ = parse_cli(argv, prog=PROG)
    from alignclip.training.trainer import train  # after the config check: a typo fails before torch loads

    quiet_unwritable_in_writer_threads()

    try:
        return train(config).exit_code
    except OSError as err:  # a run folder that cannot be written: one line (also in train.log), exit 2
        problem = run_folder_problem(err, config)
        if problem is None:
            raise
        report_run_folder_problem(problem, config)
        return 2


def run_folder_problem(err: OSError, config) -> Optional[str]:
    """One line when ``err`` says the run folder cannot be written (read-only, no permission, full), else None.
    Not the model's fault nor a passing outage: exit 2, so that a requeue does not meet the same wall."""
    from alignclip.config import run_dir_of
    from alignclip.training.checkpoint import CheckpointWriteError

    run_dir = run_dir_of(config).resolve()
    cause = err.__cause__ if isinstance(err, CheckpointWriteError) else err
    if isinstance(err, CheckpointWriteError):  # its message names the checkpoint and the cause
        unwritable = "no space left" in str(err) or getattr(cause, "errno", None) in UNWRITABLE_ERRNOS
        return str(err) if unwritable else None
    if err.errno in UNWRITABLE_ERRNOS and err.filename:
        path = Path(os.fsdecode(err.filename)).resolve()
        if path == run_dir or run_dir in path.parents:
            return f"cannot write {path}: {(err.strerror or '').lower()} (the run folder {run_dir})"
    if err.errno in (errno.ENOSPC, errno.EDQUOT) and not err.filename:
        # a writer that names no file (TensorBoard's event thread, a log flush) on the run folder's full disk
        try:
            full = shutil.disk_usage(run_dir).free < 16 * 2**20
        except OSError:
            full = False
        if full:
            return f"no space left on device: the run folder {run_dir} is full (its logs or TensorBoard events)"
    return None


def quiet_unwritable_in_writer_threads() -> None:
    """No traceback from TensorBoard's event thread when the run folder cannot take its write (full, read-only):
    the writer keeps the error and raises it in the trainer at its next write, flush or close, which reports the
    one line (``run_folder_problem``); the thread's own traceback on stderr came first and buried that line.
    Every other error of a thread prints as before."""
    default = threading.excepthook

    def hook(failure) -> None:
        if not (isinstance(failure.exc_value, OSError) and failure.exc_value.errno in UNWRITABLE_ERRNOS
                and type(failure.thread).__module__.startswith("tensorboard.")):
            default(failure)

    threading.excepthook = hook


def report_run_folder_problem(problem: str, config) -> None:
    """The line on stderr, and in train.log when that can still take it (a full disk often can: the failed save
    freed its space)."""
    from alignclip.config import run_dir_of

    print(f"run folder error: {problem}", file=sys.stderr)
    try:
        with open(run_dir_of(config) / "train.log", "a") as log:
            log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} ERROR run folder error: {problem}\n")
    except OSError:
        pass


def cli() -> NoReturn:
    """``python -m alignclip.train`` and ``alignclip-train``: ``main``, then leave at once.

    When ``main`` ends the run is final: checkpoint written and verified, monitor closed, signal handlers restored.
    The atexit handlers still run (logging's flush, multiprocessing's reaping of loader workers); the interpreter's
    module teardown is skipped. With torch, DeepSpeed and transformers loaded it costs each rank 2-3 s of CPU, time
    that a preempted job spends inside the scheduler's grace period, and a C++ thread still joinable in a static
    destructor there can abort a rank that has finished (SIGABRT), which Slurm records as a failed step.
    ``main`` itself returns the code, so in-process callers (submitit's ``TrainJob``) keep their teardown.
    """
    try:
        code = main()
    except SystemExit as stop:  # argparse: --help (0) or a malformed command line (2)
        code = int(stop.code or 0)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    cli()
