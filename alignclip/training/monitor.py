"""What a run reports: TensorBoard scalars and histograms (rank 0), a plain-text ``train.log`` in the run
directory (rank 0), and a console progress bar with ETA (rank 0). Other ranks report nothing (errors go to stderr).

TensorBoard tags (docs/training.md lists them with units):
  loss/total, loss/<term> for every active term of the objective
  train/lr, train/logit_scale (s = exp of the clamped log-scale), train/temperature (1 / s), train/grad_norm,
  train/epoch, train/skipped_steps
  perf/samples_per_s (global), perf/samples_per_s_per_device, perf/data_wait_share, perf/step_time_s,
  perf/tflops_per_device (model FLOPs of alignclip.training.flops per second and device) and perf/mfu (that over the
  device's peak; only when the peak is known: a table for H100 / H200 / A100, or fast_path.peak_tflops),
  memory/rss_gb (host) and, on CUDA, memory/max_allocated_gb
  gap/alignment_score, gap/centroid_distance (scalars) and gap/paired_cosine (histogram), every
  ``logging.gap_every_steps`` on the fixed held-out batch.

A resumed run opens its writer with ``purge_step`` = the resumed step + 1: TensorBoard then drops the events of
the interrupted session after the checkpoint, so each curve has each step once. The writer is flushed at every
checkpoint, so the events up to a checkpoint are on disk when it is.
"""

from __future__ import annotations

import logging
import resource
import sys
from pathlib import Path
from typing import Mapping, Optional

import numpy as np
import torch

from alignclip.config import LoggingConfig


def memory_gb() -> dict[str, float]:
    # ru_maxrss is in KiB on Linux: the peak resident set of this process
    stats = {"memory/rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if torch.cuda.is_available():
        stats["memory/max_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return stats


def _file_logger(run_dir: Path) -> logging.Logger:
    logger = logging.getLogger(f"alignclip.train[{run_dir}]")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if not logger.handlers:
        handler = logging.FileHandler(run_dir / "train.log", mode="a")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(handler)
    return logger


class Monitor:
    def __init__(self, run_dir: str | Path, cfg: LoggingConfig, is_main: bool, total_steps: int, start_step: int):
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.is_main = is_main
        self.writer = None
        self.bar = None
        self.log: Optional[logging.Logger] = None
        if not is_main:
            return
        self.log = _file_logger(self.run_dir)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard drops the earlier sessions' events at steps >= it; the checkpoint holds
            # steps <= start_step, so the interrupted session's later steps go and this session rewrites them.
            self.writer = SummaryWriter(log_dir=str(self.run_dir / "tb"),
                                        purge_step=start_step + 1 if start_step > 0 else None)
        if cfg.progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr, mininterval=1.0)

    def info(self, message: str) -> None:
        """A line in train.log and on the console (above the bar)."""
        if not self.is_main:
            return
        self.log.info(message)
        (self.bar.write if self.bar is not None else print)(message)

    def scalars(self, step: int, values: Mapping[str, float], text: bool = True) -> None:
        if not self.is_main:
            return
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, global_step=step)
        if text:
            self.log.info(f"step {step} " + " ".join(f"{k}={v:.6g}" for k, v in values.items()))

    def histogram(self, step: int, tag: str, values: np.ndarray) -> None:
        if self.is_main and self.writer is not None:
            self.writer.add_histogram(tag, np.asarray(values), global_step=step)

    def advance(self, step: int, postfix: Optional[Mapping[str, float]] = None) -> None:
        """Move the bar to ``step`` (its ETA is tqdm's: remaining steps / this session's rate)."""
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.log is not None:
            for handler in list(self.log.handlers):
                handler.close()
                self.log.removeHandler(handler)
