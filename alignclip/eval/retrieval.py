"""Image <-> text retrieval with several captions per image: Recall@K in both directions (CLIP_benchmark names)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from alignclip.analysis.metrics import l2_normalize

_BLOCK = 2048  # query rows per similarity block: memory ~ block x gallery floats, not queries x gallery


def retrieval_metrics(image_embeddings, text_embeddings, text_to_image: Sequence[int] | None = None,
                      ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K of text->image ("image_retrieval") and image->text ("text_retrieval").

    ``text_to_image[j]`` is the image that caption j describes (default: caption j describes image j). A caption
    query hits when its image is among the K most similar images; an image query hits when ANY of its captions
    is among the K most similar captions."""
    img, txt = l2_normalize(image_embeddings).astype(np.float32), l2_normalize(text_embeddings).astype(np.float32)
    owner = np.arange(len(txt)) if text_to_image is None else np.asarray(text_to_image, dtype=np.int64)
    if len(owner) != len(txt):
        raise ValueError(f"text_to_image has {len(owner)} entries for {len(txt)} captions")
    # Ranks count the gallery items scoring strictly above the query's own match, read from the SAME similarity
    # block (a separately computed dot product may differ in the last bit and miscount the match itself).
    # Row blocks bound memory to ~block x gallery floats.
    text_query_rank = np.zeros(len(txt), dtype=np.int64)
    for s in range(0, len(txt), _BLOCK):
        sims = txt[s:s + _BLOCK] @ img.T  # [captions in block, images]
        own = sims[np.arange(len(sims)), owner[s:s + _BLOCK]]
        text_query_rank[s:s + _BLOCK] = (sims > own[:, None]).sum(axis=1)
    # an image query hits at K when its best-ranked own caption is in the top K
    image_query_rank = np.zeros(len(img), dtype=np.int64)
    has_caption = np.zeros(len(img), dtype=bool)
    for s in range(0, len(img), _BLOCK):
        sims = img[s:s + _BLOCK] @ txt.T  # [images in block, captions]
        mine = owner[None, :] == np.arange(s, s + len(sims))[:, None]
        best_own = np.where(mine, sims, -np.inf).max(axis=1)
        image_query_rank[s:s + _BLOCK] = (sims > best_own[:, None]).sum(axis=1)
        has_caption[s:s + _BLOCK] = mine.any(axis=1)
    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = float(np.mean(text_query_rank < k))
        out[f"text_retrieval_recall@{k}"] = float(np.mean(image_query_rank[has_caption] < k))
    return out
