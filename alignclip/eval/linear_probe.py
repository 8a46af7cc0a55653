"""Linear probe: a logistic regression on frozen image features (CLIP, Radford et al. 2021, section 3.2)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from alignclip.analysis.metrics import l2_normalize
from alignclip.eval.zeroshot import classification_metrics


def linear_probe(train_features, train_labels: Sequence[int], test_features, test_labels: Sequence[int],
                 c: float = 1.0, seed: int = 0, max_iter: int = 1000) -> dict[str, float]:
    """Fit multinomial logistic regression (inverse L2 strength ``c``) on normalised train features; report
    acc1, acc5 and mean per-class recall on the test features."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
    clf.fit(l2_normalize(train_features), np.asarray(train_labels))
    scores = np.full((len(test_labels), int(max(np.max(train_labels), np.max(test_labels))) + 1), -np.inf)
    scores[:, clf.classes_] = clf.predict_log_proba(l2_normalize(test_features))
    return classification_metrics(scores, test_labels)
