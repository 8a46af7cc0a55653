"""Zero-shot classification with prompt-template ensembles (CLIP, Radford et al. 2021, section 3.1.4)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from alignclip.analysis.metrics import as_numpy, l2_normalize


def classification_metrics(logits, labels, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """top-k accuracies and the mean per-class recall (balanced accuracy) of class scores [n, C], as
    CLIP_benchmark defines them: acc_k is NaN when there are fewer than k classes (it reports acc5 = NaN below 5
    classes); the mean per-class recall averages over the classes present in ``labels``."""
    scores, y = as_numpy(logits), np.asarray(labels, dtype=np.int64)
    if len(y) != len(scores):
        raise ValueError(f"{len(scores)} rows of class scores for {len(y)} labels")
    if len(y) and (y.min() < 0 or y.max() >= scores.shape[1]):
        raise ValueError(f"labels must lie in [0, {scores.shape[1]}), found [{y.min()}, {y.max()}]")
    # CB's own ranking: torch.topk for acc@k and argmax for the predicted class (exact ties go their way)
    logits = torch.as_tensor(np.asarray(scores, np.float32))
    order = torch.topk(logits, min(max(ks), logits.shape[1]), dim=1)[1].numpy()
    out = {}
    for k in ks:
        hit = np.any(order[:, :k] == y[:, None], axis=1)
        out[f"acc{k}"] = float(np.mean(hit)) if k <= scores.shape[1] else float("nan")
    pred = logits.argmax(dim=1).numpy()
    recalls = [np.mean(pred[y == c] == c) for c in np.unique(y)]
    out["mean_per_class_recall"] = float(np.mean(recalls))
    return out


def zero_shot_classification(image_embeddings, labels, class_embeddings) -> dict[str, float]:
    """Predict argmax_c cos(image, w_c); report acc1, acc5 and the mean per-class recall. The scores are CB's,
    100 cos in float32 (the factor keeps its rounding, so its exact ties)."""
    logits = 100.0 * (torch.as_tensor(l2_normalize(image_embeddings), dtype=torch.float32)
                      @ torch.as_tensor(l2_normalize(class_embeddings), dtype=torch.float32).T)
    return classification_metrics(logits, labels)
