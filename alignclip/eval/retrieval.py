"""Image <-> text retrieval with several captions per image: Recall@K in both directions (CLIP_benchmark names)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from alignclip.analysis.metrics import l2_normalize


def retrieval_metrics(image_embeddings, text_embeddings, text_to_image: Sequence[int] | None = None,
                      ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K of text->image ("image_retrieval") and image->text ("text_retrieval").

    ``text_to_image[j]`` is the image that caption j describes (default: caption j describes image j). A caption
    query hits when its image is among the K most similar images; an image query hits when ANY of its captions
    is among the K most similar captions."""
    img, txt = l2_normalize(image_embeddings), l2_normalize(text_embeddings)
    owner = np.arange(len(txt)) if text_to_image is None else np.asarray(text_to_image, dtype=np.int64)
    if len(owner) != len(txt):
        raise ValueError(f"text_to_image has {len(owner)} entries for {len(txt)} captions")
    sims = txt @ img.T  # [captions, images]
    # rank of the true image for every caption: how many images score strictly higher
    true_score = sims[np.arange(len(txt)), owner]
    text_query_rank = (sims > true_score[:, None]).sum(axis=1)
    # an image query's best caption rank = how many captions score strictly above its best own caption
    sims_t = sims.T  # [images, captions]
    best_own = np.full(len(img), -np.inf)
    np.maximum.at(best_own, owner, sims_t[owner, np.arange(len(txt))])
    image_query_rank = (sims_t > best_own[:, None]).sum(axis=1)
    has_caption = np.isfinite(best_own)
    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = float(np.mean(text_query_rank < k))
        out[f"text_retrieval_recall@{k}"] = float(np.mean(image_query_rank[has_caption] < k))
    return out
