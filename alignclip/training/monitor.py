"""What a run reports: TensorBoard scalars and histograms (rank 0), a plain-text ``train.log`` in the run
directory (rank 0), and a console progress bar with ETA (rank 0). Other ranks report nothing (errors go to stderr).

TensorBoard tags (docs/training.md lists them with units):
  loss/total, loss/<term> for every active term of the objective
  train/lr, train/logit_scale (s = exp of the clamped log-scale), train/temperature (1 / s), train/grad_norm,
  train/epoch, train/skipped_steps, and train/imsep_weight when IMSep has an onset (loss.imsep_start_step)
  perf/samples_per_s (global), perf/samples_per_s_per_device, perf/data_wait_share, perf/step_time_s,
  perf/tflops_per_device (model FLOPs of alignclip.training.flops per second and device) and perf/mfu (that over the
  device's peak; only when the peak is known: a table for H100 / H200 / A100, or fast_path.peak_tflops),
  memory/rss_gb (host) and, on CUDA, memory/max_allocated_gb
  gap/alignment_score, gap/centroid_distance (scalars) and gap/paired_cosine (histogram), every
  ``logging.gap_every_steps`` on the fixed held-out batch, with the images gap/cosine_cdf and gap/pca_projection
  (the plots of alignclip.analysis.plots)
  eval/<task>/<metric>: zero-shot classification or retrieval on the ``eval`` section's dataset, every
  ``eval.every_steps`` (OpenCLIP's --zeroshot-frequency)
  config (text): the resolved config as YAML, at the start of every session
  hparams: the flattened config and the final gap and eval figures, when the run completes (a ``hparams`` sub-run,
  so runs of a sweep line up in TensorBoard's HParams view); the same figures go to <run_dir>/final_metrics.json
  (which alignclip-export's model card reads)

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

from alignclip.config import Config, LoggingConfig, to_yaml
from alignclip.fs import UNWRITABLE_ERRNOS


def memory_gb() -> dict[str, float]:
    # ru_maxrss is in KiB on Linux: the peak resident set of this process
    stats = {"memory/rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if torch.cuda.is_available():
        stats["memory/max_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return stats


class RunLogHandler(logging.FileHandler):
    """train.log's handler. A write the run folder cannot take (full, read-only) is raised to the trainer, which
    stops with one line naming the run folder (exit 2); logging's default printed "--- Logging error ---" with
    two tracebacks and trained on without its log until the next checkpoint met the full disk."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's naming)
        err = sys.exc_info()[1]
        if isinstance(err, OSError) and err.errno in UNWRITABLE_ERRNOS:
            raise err
        super().handleError(record)


def _file_logger(run_dir: Path) -> logging.Logger:
    logger = logging.getLogger(f"alignclip.train[{run_dir}]")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if not logger.handlers:
        handler = RunLogHandler(run_dir / "train.log", mode="a")
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

    def run_config(self, config: Config, step: int) -> None:
        """The resolved config as a text summary (tag ``config``)."""
        if self.is_main and self.writer is not None:
            self.writer.add_text("config", "```yaml\n" + to_yaml(config) + "```", global_step=step)

    def gap_plots(self, step: int, images, texts) -> None:
        """The paired-cosine CDF and the 2-D PCA projection of the held-out batch as images."""
        if not (self.is_main and self.writer is not None):
            return
        import tempfile

        from PIL import Image

        from alignclip.analysis.plots import plot_cosine_cdf, plot_projection

        pairs = {f"step {step}": (images, texts)}
        with tempfile.TemporaryDirectory() as tmp:
            for tag, plot in (("gap/cosine_cdf", plot_cosine_cdf), ("gap/pca_projection", plot_projection)):
                with Image.open(plot(pairs, Path(tmp) / "plot.png")) as img:
                    pixels = np.asarray(img.convert("RGB"))
                self.writer.add_image(tag, pixels, global_step=step, dataformats="HWC")

    def evaluation(self, step: int, results: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
        """CLIP_benchmark-style results (task -> metrics) as scalars ``eval/<task>/<metric>``; returns them."""
        flat = {f"eval/{task}/{name}": float(value) for task, metrics in results.items()
                for name, value in metrics.items()}
        self.scalars(step, flat)
        return flat

    def hparams(self, config: Config, final_metrics: Mapping[str, float]) -> None:
        """The flattened config with the final figures, for the HParams view, and <run_dir>/final_metrics.json."""
        if not self.is_main:
            return
        import json

        metrics = {k: float(v) for k, v in final_metrics.items() if np.isfinite(v)}
        (self.run_dir / "final_metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True) + "\n")
        if self.writer is not None and metrics:
            self.writer.add_hparams(flat_hparams(config), {f"final/{k}": v for k, v in metrics.items()},
                                    run_name="hparams")

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


def flat_hparams(config: Config) -> dict[str, float | int | str | bool]:
    """Every config leaf as ``section.key`` -> value (TensorBoard's hparams take numbers, strings and booleans)."""
    from omegaconf import OmegaConf

    out: dict = {}

    def walk(prefix: str, node) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(name + ".", value)
            elif isinstance(value, (bool, int, float, str)):
                out[name] = value
            else:  # None, lists: as text
                out[name] = str(value)

    walk("", OmegaConf.to_container(OmegaConf.structured(config), resolve=True))
    return out
