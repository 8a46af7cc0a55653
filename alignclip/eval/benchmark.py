"""A model on a standard dataset (alignclip.eval.datasets): batched encoding through a DataLoader with workers
on any device, then CLIP_benchmark's tasks with its metric definitions.

    classification: zeroshot_classification (acc1, acc5, mean_per_class_recall), and linear_probe when a train
                    split is given (fit on train, scored on test)
    retrieval:      zeroshot_retrieval (image_retrieval_recall@k, text_retrieval_recall@k)

Any model with OpenCLIP's ``encode_image`` / ``encode_text`` works (ours, OpenCLIP's, an AlignedModel).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from alignclip.embeddings import encode_texts
from alignclip.eval.datasets import ClassificationData, RetrievalData
from alignclip.eval.linear_probe import linear_probe
from alignclip.eval.retrieval import retrieval_metrics
from alignclip.eval.zeroshot import build_classifier, zero_shot_classification


def _captions_collate(batch):
    images, captions = zip(*batch)
    return torch.stack(list(images)), [list(c) for c in captions]


def _loader(dataset, batch_size: int, workers: int, collate=None) -> DataLoader:
    # an IterableDataset (webdataset) splits its shards over the workers itself
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate,
                      persistent_workers=False)


@torch.no_grad()
def encode_images_and_labels(model, dataset, device: str, batch_size: int, workers: int,
                             collate=None) -> tuple[np.ndarray, list]:
    """Normalised image embeddings of every sample and the sample's second element (label or captions)."""
    model.eval()
    dtype = next(model.parameters()).dtype  # bf16 weights (a bf16 training engine) take bf16 pixels
    images, targets = [], []
    for pixels, target in _loader(dataset, batch_size, workers, collate):
        images.append(model.encode_image(pixels.to(device, dtype), normalize=True).float().cpu())
        targets.extend(target.tolist() if torch.is_tensor(target) else target)
    if not images:
        raise ValueError("the dataset yielded no sample")
    return torch.cat(images).numpy(), targets


def evaluate_classification(model, tokenizer, data: ClassificationData, device: str = "cpu",
                            batch_size: int = 64, workers: int = 0,
                            train: ClassificationData | None = None) -> dict[str, dict[str, float]]:
    """zeroshot_classification, plus linear_probe (fitted on ``train``) when a train split is given."""
    weights = build_classifier(lambda texts: encode_texts(model, tokenizer, list(texts), device=device),
                               data.classnames, data.templates)
    image, labels = encode_images_and_labels(model, data.dataset, device, batch_size, workers)
    results = {"zeroshot_classification": zero_shot_classification(image, labels, weights)}
    if train is not None:
        train_image, train_labels = encode_images_and_labels(model, train.dataset, device, batch_size, workers)
        results["linear_probe"] = linear_probe(train_image, train_labels, image, labels)
    return results


def evaluate_retrieval(model, tokenizer, data: RetrievalData, device: str = "cpu", batch_size: int = 64,
                       workers: int = 0, ks: Sequence[int] = (1, 5, 10)) -> dict[str, dict[str, float]]:
    image, captions = encode_images_and_labels(model, data.dataset, device, batch_size, workers, _captions_collate)
    owner = np.array([i for i, caps in enumerate(captions) for _ in caps], dtype=np.int64)
    text = encode_texts(model, tokenizer, [c for caps in captions for c in caps], device=device)
    return {"zeroshot_retrieval": retrieval_metrics(image, text, owner, ks=ks)}


def evaluate_benchmark(model, tokenizer, data: ClassificationData | RetrievalData, device: str = "cpu",
                       batch_size: int = 64, workers: int = 0, train: ClassificationData | None = None,
                       ) -> dict[str, dict[str, float]]:
    """CLIP_benchmark task name -> metrics for one dataset."""
    if isinstance(data, RetrievalData):
        return evaluate_retrieval(model, tokenizer, data, device, batch_size, workers)
    return evaluate_classification(model, tokenizer, data, device, batch_size, workers, train)



def evaluate_during_training(model, config) -> dict[str, dict[str, float]]:
    """The ``eval`` section's dataset with the model being trained (rank 0, its device and dtype); the model's
    train/eval mode is restored."""
    from alignclip.eval.datasets import open_benchmark
    from alignclip.export import ImageTransform
    from alignclip.tokenizer import get_tokenizer

    e, m = config.eval, config.model
    data = open_benchmark(e.dataset, e.root, e.split, ImageTransform(m.vision.image_size), e.annotations)
    was_training = model.training
    try:
        return evaluate_benchmark(model, get_tokenizer(m.text.context_length), data,
                                  str(next(model.parameters()).device), e.batch_size, e.workers)
    finally:
        model.train(was_training)
