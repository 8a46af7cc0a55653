"""Pretrain CLIP / SharedCLIP / AlignCLIP with DeepSpeed.

    python -m alignclip.train --config configs/experiment/NAME.yaml key=value ...
    torchrun --nproc-per-node 8 -m alignclip.train --config ...      # or under srun / submitit

Restarting the same command continues from the run directory's latest checkpoint. Exit codes: 0 finished,
124 (``alignclip.training.preemption.REQUEUE_EXIT_CODE``) stopped by a preemption signal after saving a checkpoint
(requeue me), 2 configuration error or no usable checkpoint in a run directory that has some, 1 any other
failure.
"""

from __future__ import annotations

import sys
from typing import Optional

from alignclip.config import ConfigError, parse_cli


def main(argv: Optional[list[str]] = None) -> None:
    config, _ = parse_cli(argv, prog="python -m alignclip.train")
    from alignclip.training.checkpoint import CheckpointError
    from alignclip.training.trainer import train  # after the config check: a typo fails before torch loads

    try:
        result = train(config)
    except CheckpointError as err:  # every checkpoint of the run directory failed verification
        print(f"checkpoint error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    raise SystemExit(result.exit_code)


if __name__ == "__main__":
    main()
