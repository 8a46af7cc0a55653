"""Image <-> text retrieval with several captions per image: Recall@K in both directions, CLIP_benchmark's figures
under its names, and a tie-aware expectation next to them.

``image_retrieval_recall@K`` / ``text_retrieval_recall@K`` are CLIP_benchmark's own computation (its
``zeroshot_retrieval.recall_at_k``): the score matrix ``texts @ images.T`` in float32, ``torch.topk``, a query hits
when one of its own items is among the K returned; exact ties go the way ``torch.topk`` orders them. Identical
captions (web alt-text is full of them) tie exactly, because every distinct caption is encoded once
(``alignclip.embeddings.encode_texts``), so the figures equal CB's on the same data in the same order.
``..._recall_tie_aware@K`` break ties uniformly at random in expectation (``tie_aware_hit_rate``): a query whose
own caption is one of many identical ones scores chance there, not whatever the index order gives.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from alignclip.analysis.metrics import l2_normalize

_BLOCK = 2048  # query rows per similarity block: memory ~ block x gallery floats, not queries x gallery


def tie_aware_hit_rate(above: np.ndarray, tied_own: np.ndarray, tied_other: np.ndarray, k: int) -> np.ndarray:
    """P(at least one own item in the top k) per query when ties are broken uniformly at random.

    ``above``: gallery items scoring strictly above the query's best own item (none of them own); ``tied_own`` /
    ``tied_other``: own / other items scoring exactly that best score. With m = k - above free slots, the tie group
    misses every own item with probability C(other, m) / C(own + other, m). Without ties this is the plain 0/1 hit
    CLIP_benchmark counts; with ties a query gains no advantage (identical captions score chance, not 1)."""
    free = np.clip(k - above, 0, None)
    miss = np.ones(len(above), dtype=np.float64)
    for i in range(int(free.max(initial=0))):
        active = i < free
        factor = np.clip(tied_other - i, 0, None) / np.maximum(tied_own + tied_other - i, 1)
        miss = np.where(active, miss * factor, miss)
    return np.where(free > 0, 1.0 - miss, 0.0)


def retrieval_metrics(image_embeddings, text_embeddings, text_to_image: Sequence[int] | None = None,
                      ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K of text->image ("image_retrieval") and image->text ("text_retrieval"): CLIP_benchmark's figures
    (``topk_recall``), then the same with ties broken uniformly at random in expectation (``..._tie_aware@K``,
    ``tie_aware_hit_rate``).

    ``text_to_image[j]`` is the image that caption j describes (default: caption j describes image j)."""
    img, txt = l2_normalize(image_embeddings).astype(np.float32), l2_normalize(text_embeddings).astype(np.float32)
    owner = np.arange(len(txt)) if text_to_image is None else np.asarray(text_to_image, dtype=np.int64)
    if len(owner) != len(txt):
        raise ValueError(f"text_to_image has {len(owner)} entries for {len(txt)} captions")
    if len(owner) and (owner.min() < 0 or owner.max() >= len(img)):
        raise ValueError(f"text_to_image holds image indices outside [0, {len(img)})")
    # Counts are read from the SAME similarity block as the query's own score (a separately computed dot product
    # may differ in the last bit); row blocks bound memory to ~block x gallery floats.
    text_counts = np.zeros((3, len(txt)), dtype=np.int64)  # above, tied own (always 1), tied other
    for s in range(0, len(txt), _BLOCK):
        sims = txt[s:s + _BLOCK] @ img.T  # [captions in block, images]
        own = sims[np.arange(len(sims)), owner[s:s + _BLOCK]]
        text_counts[0, s:s + _BLOCK] = (sims > own[:, None]).sum(axis=1)
        text_counts[1, s:s + _BLOCK] = 1
        text_counts[2, s:s + _BLOCK] = (sims == own[:, None]).sum(axis=1) - 1
    image_counts = np.zeros((3, len(img)), dtype=np.int64)
    has_caption = np.zeros(len(img), dtype=bool)
    for s in range(0, len(img), _BLOCK):
        sims = img[s:s + _BLOCK] @ txt.T  # [images in block, captions]
        mine = owner[None, :] == np.arange(s, s + len(sims))[:, None]
        best_own = np.where(mine, sims, -np.inf).max(axis=1)[:, None]
        image_counts[0, s:s + _BLOCK] = (sims > best_own).sum(axis=1)
        image_counts[1, s:s + _BLOCK] = ((sims == best_own) & mine).sum(axis=1)
        image_counts[2, s:s + _BLOCK] = ((sims == best_own) & ~mine).sum(axis=1)
        has_caption[s:s + _BLOCK] = mine.any(axis=1)
    out = topk_recall(image_embeddings, text_embeddings, owner, ks)
    for k in ks:
        out[f"image_retrieval_recall_tie_aware@{k}"] = float(np.mean(tie_aware_hit_rate(*text_counts, k)))
        out[f"text_retrieval_recall_tie_aware@{k}"] = float(np.mean(
            tie_aware_hit_rate(*image_counts[:, has_caption], k)))
    return out


def topk_recall(image_embeddings, text_embeddings, owner: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    """CLIP_benchmark's recall (``zeroshot_retrieval.evaluate``): F.normalize, scores = texts @ images.T, and per
    query whether ``torch.topk``'s K items hold one of its own; an image without captions counts as a miss (CB's
    0 / 0 > 0). Unlike CB, a K larger than the gallery takes the whole gallery instead of failing."""
    img = torch.nn.functional.normalize(torch.as_tensor(np.asarray(image_embeddings, np.float32)), dim=-1)
    txt = torch.nn.functional.normalize(torch.as_tensor(np.asarray(text_embeddings, np.float32)), dim=-1)
    scores = txt @ img.t()
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(scores)), torch.as_tensor(owner)] = True
    out = {}
    for k in ks:
        for name, s, p in (("image", scores, positive), ("text", scores.t(), positive.t())):
            top = torch.topk(s, min(k, s.shape[1]), dim=1)[1]
            out[f"{name}_retrieval_recall@{k}"] = float(p.gather(1, top).any(dim=1).float().mean())
    return {key: out[key] for key in [f"{n}_retrieval_recall@{k}" for k in ks for n in ("image", "text")]}
