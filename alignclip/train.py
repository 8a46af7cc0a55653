"""Pretrain CLIP / SharedCLIP / AlignCLIP with DeepSpeed.

    python -m alignclip.train --config configs/experiment/NAME.yaml key=value ...
    torchrun --nproc-per-node 8 -m alignclip.train --config ...      # or under srun / submitit

Restarting the same command continues from the run directory's latest checkpoint. Exit codes: 0 finished,
124 (``alignclip.training.preemption.REQUEUE_EXIT_CODE``) stopped by a preemption signal after saving a checkpoint
(requeue me), 2 configuration error or no usable checkpoint in a run directory that has some, 1 any other
failure.
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import NoReturn, Optional

from alignclip.config import parse_cli
from alignclip.errors import ConfigError, run_command

PROG = "alignclip-train"


def main(argv: Optional[list[str]] = None) -> int:
    """The run's exit code; a config error, or no usable checkpoint in a run directory that has some
    (``CheckpointError``, a ``ConfigError``), is one line on stderr and 2."""
    return run_command(PROG, lambda: _train(argv), errors=(ConfigError,))  # any other error is a bug: traceback


def _train(argv: Optional[list[str]]) -> int:
    config, _ = parse_cli(argv, prog=PROG)
    from alignclip.training.trainer import train  # after the config check: a typo fails before torch loads

    return train(config).exit_code


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
