"""Data: webdataset shards (CC12M as img2dataset writes them, or the generated dataset) to training batches.

Entry points: ``plan_train_data`` (the training data resolved once per run: shards, epoch length, caption
embeddings), ``build_train_loader`` (one epoch of one rank's batches from that plan, known length, exact resume via
``start_batch``; a source that fails after the start raises ``DataSourceError``), ``build_eval_batch`` (a fixed
held-out batch), ``iter_eval_batches`` (a whole split, in order); ``load_rgb`` (``alignclip.data.images``) is the one
image decoder for the shard tools and evaluation, and decides for training too (whose JPEGs take libjpeg-turbo
directly, or the GPU with ``data.decode: gpu``). See docs/data.md.
"""

from alignclip.data.images import load_rgb
from alignclip.data.pipeline import (DataSourceError, TrainData, TrainLoader, build_eval_batch, build_train_loader,
                                     iter_eval_batches, plan_train_data, reduce_stats, resolve_spec)

__all__ = ["load_rgb", "DataSourceError", "TrainData", "TrainLoader", "plan_train_data", "build_train_loader",
           "build_eval_batch", "iter_eval_batches", "reduce_stats", "resolve_spec"]
