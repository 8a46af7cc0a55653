"""The text side of zero-shot classification (CLIP, Radford et al. 2021, section 3.1.4): class names filled into
prompt templates, encoded, and averaged per class into one weight vector. Below both the embedding cache
(``alignclip.embeddings``, which stores the classifiers of a dataset's tasks) and evaluation (``alignclip.eval``)."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from alignclip.analysis.metrics import l2_normalize


def class_prompts(classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every template filled with every class name, class-major: [c0t0, c0t1, ..., c1t0, ...].

    A template holds ``{c}`` (CLIP_benchmark style) or ``{}`` where the class name goes."""
    if not templates:
        raise ValueError("zero-shot classification needs at least one prompt template")
    out = []
    for name in classnames:
        for template in templates:
            out.append(template.replace("{c}", name) if "{c}" in template else template.format(name))
    return out


def ensemble_class_embeddings(prompt_embeddings, num_classes: int) -> np.ndarray:
    """w_c = normalise(mean_t normalise(e_{c,t})): the template ensemble of each class, from class-major rows."""
    emb = l2_normalize(prompt_embeddings)
    if emb.shape[0] % num_classes:
        raise ValueError(f"{emb.shape[0]} prompt embeddings do not split evenly into {num_classes} classes")
    return l2_normalize(emb.reshape(num_classes, -1, emb.shape[1]).mean(axis=1))


def build_classifier(encode_text: Callable[[list[str]], np.ndarray], classnames: Sequence[str],
                     templates: Sequence[str]) -> np.ndarray:
    """Class weight matrix [C, d] from a text encoder (list of strings -> embeddings)."""
    return ensemble_class_embeddings(encode_text(class_prompts(classnames, templates)), len(classnames))
