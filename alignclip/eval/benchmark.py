"""A model on a standard dataset (alignclip.eval.datasets): batched encoding through a DataLoader with workers
on any device, then CLIP_benchmark's tasks with its metric definitions.

    classification: zeroshot_classification (acc1, acc5, mean_per_class_recall), and linear_probe when a train
                    split is given (fit on train, scored on test)
    retrieval:      zeroshot_retrieval (image_retrieval_recall@k, text_retrieval_recall@k)

Any model with OpenCLIP's ``encode_image`` / ``encode_text`` works (ours, OpenCLIP's, an AlignedModel).

Preemption (alignclip.distributed.process). The loaders' workers ignore the preemption signals and start with them
blocked, like the training loader's: Slurm signals every process of the step, and a worker killed by it would fail
the trainer (or the tool) with "DataLoader worker ... killed by signal" instead of letting it act. The trainer's
periodic evaluation passes ``should_stop`` (its preemption flag, read locally): checked between batches of images
and of texts, it ends the evaluation with ``EvaluationStopped`` and no figures, so the checkpoint is written
promptly. The standalone tool has no handler: SIGTERM ends it, and its workers die with it (PDEATHSIG).

Unreadable images (``alignclip.eval.datasets.Unreadable``: the one reason an image is left out) are dropped from
their batch, named in a warning and counted: every task's metrics state ``images_measured`` and ``images_skipped``
(the linear probe also ``train_images_measured`` / ``train_images_skipped``, retrieval ``captions_measured``), so a
figure says what it rests on, in the JSON and in TensorBoard.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, default_collate

from alignclip.data.transforms import ImageTransform
from alignclip.embeddings import encode_texts
from alignclip.eval.datasets import ClassificationData, RetrievalData, Unreadable
from alignclip.eval.linear_probe import linear_probe
from alignclip.eval.retrieval import retrieval_metrics
from alignclip.distributed.process import ignore_preemption_signals, preemption_signals_blocked
from alignclip.eval.zeroshot import zero_shot_classification
from alignclip.prompts import build_classifier

TEXT_BATCH = 256  # distinct texts per encode_text call

StopCheck = Optional[Callable[[], bool]]
log = logging.getLogger(__name__)


class EvaluationStopped(Exception):
    """``should_stop()`` turned true during an evaluation (a pending preemption): it ended early, without figures.
    The message says how far it got ("after 3 of 40 image batches")."""


def _captions_collate(batch):
    images, captions = zip(*batch)
    return torch.stack(list(images)), [list(c) for c in captions]


class _SkippingUnreadable:
    """A collate function: (the readable samples collated, or None; the batch's ``Unreadable`` images)."""

    def __init__(self, collate=None):
        self.collate = collate or default_collate

    def __call__(self, batch):
        readable = [s for s in batch if not isinstance(s[0], Unreadable)]
        return (self.collate(readable) if readable else None), [s[0] for s in batch if isinstance(s[0], Unreadable)]


def _loader(dataset, batch_size: int, workers: int, collate=None) -> DataLoader:
    # an IterableDataset (webdataset) splits its shards over the workers itself
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      collate_fn=_SkippingUnreadable(collate), persistent_workers=False,
                      worker_init_fn=ignore_preemption_signals)


def _batches_of(loader: DataLoader) -> str:
    try:
        return f" of {len(loader)}"
    except TypeError:  # an IterableDataset without a length
        return ""


@torch.no_grad()
def encode_images_and_labels(model, dataset, device: str, batch_size: int, workers: int, collate=None,
                             should_stop: StopCheck = None) -> tuple[np.ndarray, list, list[Unreadable]]:
    """Normalised image embeddings of every readable sample, the sample's second element (label or captions), and
    the unreadable images skipped. Raises ``EvaluationStopped`` before the next batch once ``should_stop()`` is
    true."""
    model.eval()
    dtype = next(model.parameters()).dtype  # bf16 weights (a bf16 training engine) take bf16 pixels
    loader = _loader(dataset, batch_size, workers, collate)
    if should_stop and should_stop():
        raise EvaluationStopped(f"after 0{_batches_of(loader)} image batches")  # no worker forked
    with preemption_signals_blocked():  # the workers start here; each ignores the signals before unblocking
        batches = iter(loader)
    images, targets, skipped, stopped, done = [], [], [], False, 0
    for readable, unreadable in batches:
        if should_stop and should_stop():  # a signal that came while this batch was read has set the flag
            stopped = True
            break
        done += 1
        skipped += unreadable
        if readable is not None:
            pixels, target = readable
            images.append(model.encode_image(pixels.to(device, dtype), normalize=True).float().cpu())
            targets.extend(target.tolist() if torch.is_tensor(target) else target)
    del batches  # stopped: the workers shut down now, before the trainer saves
    if stopped:
        raise EvaluationStopped(f"after {done}{_batches_of(loader)} image batches")
    if skipped:
        log.warning("evaluation: %d unreadable image(s) skipped, e.g. %s", len(skipped),
                    "; ".join(f"{u.source} ({u.reason})" for u in skipped[:3]))
    if not images:
        raise ValueError(f"the dataset yielded no readable sample ({len(skipped)} unreadable)" if skipped
                         else "the dataset yielded no sample")
    return torch.cat(images).numpy(), targets, skipped


def _with_counts(metrics: dict[str, float], measured: int, skipped: list, prefix: str = "") -> dict[str, float]:
    """The figures and the images they rest on: ``images_measured``, and ``images_skipped`` (images that do not
    decode, each named in a warning), always stated; ints, so 2 in the JSON and tables, not 2.0000."""
    return {**metrics, f"{prefix}images_measured": measured, f"{prefix}images_skipped": len(skipped)}


def _encode_texts(model, tokenizer, texts: Sequence[str], device: str, should_stop: StopCheck = None,
                  what: str = "texts") -> np.ndarray:
    """``encode_texts``, raising ``EvaluationStopped`` between batches once ``should_stop()`` is true: ImageNet's
    1,000 classes x 80 templates alone are 313 batches. The counts are of distinct texts."""
    def check(done: int, total: int) -> None:
        if should_stop and should_stop():
            raise EvaluationStopped(f"after {done} of {total} {what}")

    return encode_texts(model, tokenizer, list(texts), TEXT_BATCH, device, before_batch=check)


def evaluate_classification(model, tokenizer, data: ClassificationData, device: str = "cpu",
                            batch_size: int = 64, workers: int = 0, train: ClassificationData | None = None,
                            should_stop: StopCheck = None) -> dict[str, dict[str, float]]:
    """zeroshot_classification, plus linear_probe (fitted on ``train``) when a train split is given; the two
    splits must have the same classes in the same order (the labels are indices into them)."""
    if train is not None and train.classnames != data.classnames:
        raise ValueError(f"the probe's train split has {len(train.classnames)} classes ({_first(train.classnames)}), "
                         f"the evaluated split {len(data.classnames)} ({_first(data.classnames)}): the labels "
                         "would not match")
    weights = build_classifier(
        lambda texts: _encode_texts(model, tokenizer, texts, device, should_stop, "class prompts"),
        data.classnames, data.templates)
    image, labels, skipped = encode_images_and_labels(model, data.dataset, device, batch_size, workers,
                                                      should_stop=should_stop)
    results = {"zeroshot_classification": _with_counts(zero_shot_classification(image, labels, weights),
                                                       len(image), skipped)}
    if train is not None:
        train_image, train_labels, train_skipped = encode_images_and_labels(
            model, train.dataset, device, batch_size, workers, should_stop=should_stop)
        probe = _with_counts(linear_probe(train_image, train_labels, image, labels), len(image), skipped)
        results["linear_probe"] = _with_counts(probe, len(train_image), train_skipped, "train_")
    return results


def evaluate_retrieval(model, tokenizer, data: RetrievalData, device: str = "cpu", batch_size: int = 64,
                       workers: int = 0, ks: Sequence[int] = (1, 5, 10),
                       should_stop: StopCheck = None) -> dict[str, dict[str, float]]:
    image, captions, skipped = encode_images_and_labels(model, data.dataset, device, batch_size, workers,
                                                        _captions_collate, should_stop)
    owner = np.array([i for i, caps in enumerate(captions) for _ in caps], dtype=np.int64)
    text = _encode_texts(model, tokenizer, [c for caps in captions for c in caps], device, should_stop, "captions")
    metrics = _with_counts(retrieval_metrics(image, text, owner, ks=ks), len(image), skipped)
    return {"zeroshot_retrieval": {**metrics, "captions_measured": len(text)}}


def _first(names: Sequence[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def evaluate_benchmark(model, tokenizer, data: ClassificationData | RetrievalData, device: str = "cpu",
                       batch_size: int = 64, workers: int = 0, train: ClassificationData | None = None,
                       should_stop: StopCheck = None) -> dict[str, dict[str, float]]:
    """CLIP_benchmark task name -> metrics for one dataset. With ``should_stop``, raises ``EvaluationStopped``
    (between batches) once it returns true."""
    if isinstance(data, RetrievalData):
        if train is not None:
            raise ValueError("a linear probe needs a classification dataset; this one is image-text retrieval")
        return evaluate_retrieval(model, tokenizer, data, device, batch_size, workers, should_stop=should_stop)
    return evaluate_classification(model, tokenizer, data, device, batch_size, workers, train, should_stop)


def evaluate_during_training(model, config, should_stop: StopCheck = None) -> dict[str, dict[str, float]]:
    """The ``eval`` section's dataset with the model being trained (rank 0, its device and dtype); the model's
    train/eval mode is restored. ``should_stop``: the trainer's local read of its preemption flag; once true,
    ``EvaluationStopped`` ends the evaluation (no figures) so the trainer reaches its checkpoint promptly."""
    from alignclip.eval.datasets import open_benchmark
    from alignclip.tokenizer import get_tokenizer

    e, m = config.eval, config.model
    data = open_benchmark(e.dataset, e.root, e.split, ImageTransform(m.vision.image_size), e.annotations)
    was_training = model.training
    try:
        return evaluate_benchmark(model, get_tokenizer(m.text.context_length), data,
                                  str(next(model.parameters()).device), e.batch_size, e.workers,
                                  should_stop=should_stop)
    finally:
        model.train(was_training)
