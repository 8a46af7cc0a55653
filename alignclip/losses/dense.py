"""Dense reference implementations of every loss term, in the gathered layout.

Sources: the CLIP, CRSep and IMSep terms follow Eslami & de Melo, "Mitigate the Gap", ICLR 2025, arXiv:2406.17639
(eq. 1-13); the uniformity and alignment terms follow Fahim, Murphy & Fyshe, "It's Not a Modality Gap", 2024,
arXiv:2405.18570 (eq. 2-5).

Layout. A rank holds ``n`` local samples; ``*_all`` are the features of the whole global batch of ``N`` samples
(gathered from every rank, the local ones included, in rank order), and ``offset`` is the global index of this
rank's first sample (``rank * n``). Each function computes the rows of the local samples against all ``N`` columns;
the positive of local row ``i`` sits in column ``offset + i``. With ``offset = 0`` and ``*_local is *_all`` the
functions are the plain single-process losses on one batch.

Every cross-entropy term returned here is a MEAN OVER THE LOCAL ROWS, so the average over ranks of a rank's value
is the global-batch loss. The uniformity terms are the log of a mean over all pairs; they take an ``all_reduce``
callable that sums each rank's partial sum (with gradient) before the log.

Notation: E_v, E_t are the L2-normalised image and text embeddings, s = exp(logit_scale), CE(L, y) the mean over
rows i of -log softmax(L_i)[y_i], P = E_v E_t^T (Eslami & de Melo eq. 1-4).

These functions materialise n x N matrices: they are the oracle the fused implementations
(``alignclip.losses.chunked``, ``alignclip.losses.triton_kernels``) are tested against, and what ``loss.impl=dense``
runs. A fused implementation provides ``contrastive_terms`` with exactly this signature and return type.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

IMSEP_SIDES = ("image", "text")


class ContrastiveTerms(NamedTuple):
    """The cross-entropy terms of one rank, each a mean over its local rows (``None`` when not requested).

    image_to_text: CE(s P, y)            (rows: local images, columns: all texts)
    text_to_image: CE(s P^T, y)          (rows: local texts, columns: all images)
    imsep_image:   L_IMsep, image side   (Eslami & de Melo eq. 7-11)
    imsep_text:    L_IMsep, text side    (their appendix A.2, "TT")
    """

    image_to_text: Optional[Tensor]
    text_to_image: Optional[Tensor]
    imsep_image: Optional[Tensor]
    imsep_text: Optional[Tensor]


def local_labels(n: int, offset: int, device: torch.device) -> Tensor:
    """The column of each local row's positive: ``offset + i``."""
    return torch.arange(offset, offset + n, device=device)


def cross_modal_cross_entropies(image_local: Tensor, text_local: Tensor, image_all: Tensor, text_all: Tensor,
                                logit_scale: Tensor, offset: int) -> tuple[Tensor, Tensor]:
    """(CE(s P, y), CE(s P^T, y)) for the local rows (Eslami & de Melo eq. 2-3).

    Row i of s P^T is text i against all images, so the text->image direction uses the LOCAL texts against ALL
    images (not the transpose of this rank's image->text block, which would only hold local image columns).
    """
    scale = logit_scale.exp()
    labels = local_labels(image_local.shape[0], offset, image_local.device)
    image_to_text = F.cross_entropy(scale * image_local @ text_all.T, labels)
    text_to_image = F.cross_entropy(scale * text_local @ image_all.T, labels)
    return image_to_text, text_to_image


def imsep_loss(same_local: Tensor, same_all: Tensor, positive_logit: Tensor, logit_scale: Tensor, offset: int,
               semantic_local: Optional[Tensor] = None, semantic_all: Optional[Tensor] = None) -> Tensor:
    """L_IMsep on one side (Eslami & de Melo eq. 7-11): CE(s [diag(P) + (X X^T) ⊙ D], y).

    same_local / same_all: the side's embeddings X (E_v for the image side, E_t for the text side).
    positive_logit: [n] the paired cosine v_i . t_i of each local row, placed on the diagonal.
    semantic_*: unit-norm sentence embeddings E_s; S = E_s E_s^T and D = 1 - S (eq. 8). When both are ``None``,
    D = 1 (no rescaling, Table 7 ablation): a plain intra-modal contrastive loss with the pair as positive.
    The diagonal is SET to s (v_i . t_i), not left to 1 - S_ii = 0 (rounding would make it a tiny non-zero).
    """
    n = same_local.shape[0]
    labels = local_labels(n, offset, same_local.device)
    similarity = same_local @ same_all.T  # V or T, local rows: [n, N]  (eq. 7)
    if semantic_local is not None:
        distance = 1.0 - semantic_local @ semantic_all.T  # D = 1 - S  (eq. 8)
        similarity = similarity * distance  # V_D = V ⊙ D  (eq. 9)
    logits = similarity.scatter(1, labels[:, None], positive_logit[:, None].to(similarity.dtype))  # eq. 10
    return F.cross_entropy(logit_scale.exp() * logits, labels)  # eq. 11


def check_imsep_inputs(imsep_sides: tuple[str, ...], imsep_rescale: bool, semantic_local: Optional[Tensor],
                       semantic_all: Optional[Tensor]) -> None:
    """The IMSep arguments every implementation of ``contrastive_terms`` takes, checked once for all."""
    unknown = set(imsep_sides) - set(IMSEP_SIDES)
    if unknown:
        raise ValueError(f"imsep_sides: unknown side(s) {sorted(unknown)}; expected a subset of {IMSEP_SIDES}")
    if imsep_sides and imsep_rescale and (semantic_local is None or semantic_all is None):
        raise ValueError("IMSep with rescaling needs semantic embeddings (semantic_local and semantic_all); "
                         "pass them, or set loss.imsep_rescale=false for D = 1")


def contrastive_terms(image_local: Tensor, text_local: Tensor, image_all: Tensor, text_all: Tensor,
                      semantic_local: Optional[Tensor], semantic_all: Optional[Tensor], logit_scale: Tensor,
                      offset: int, *, cross_modal: bool = True, imsep_sides: tuple[str, ...] = (),
                      imsep_rescale: bool = True) -> ContrastiveTerms:
    """The CLIP / CRsep / IMSep cross-entropies of this rank's rows (the interface of every implementation).

    Args:
        image_local, text_local: [n, d] this rank's normalised E_v, E_t rows.
        image_all, text_all: [N, d] the gathered global batch (gradients flow into both local and gathered).
        semantic_local, semantic_all: [n, k] / [N, k] unit-norm sentence embeddings (no gradient); needed when
            ``imsep_sides`` is non-empty and ``imsep_rescale`` is on, otherwise may be ``None``.
        logit_scale: scalar log-scale (already clamped); s = exp(logit_scale) multiplies every logit.
        offset: global index of this rank's first row.
        cross_modal: compute CE(s P, y) and CE(s P^T, y).
        imsep_sides: a subset of ("image", "text").
        imsep_rescale: D = 1 - S when on, D = 1 when off.
    Returns:
        ContrastiveTerms, each a mean over the local rows or ``None``.
    """
    check_imsep_inputs(imsep_sides, imsep_rescale, semantic_local, semantic_all)
    image_to_text = text_to_image = None
    if cross_modal:
        image_to_text, text_to_image = cross_modal_cross_entropies(
            image_local, text_local, image_all, text_all, logit_scale, offset)
    sem_local, sem_all = (semantic_local, semantic_all) if imsep_rescale else (None, None)
    positive = (image_local * text_local).sum(dim=1)  # diag(P) of the local rows
    imsep = {side: None for side in IMSEP_SIDES}
    for side in imsep_sides:
        x_local, x_all = (image_local, image_all) if side == "image" else (text_local, text_all)
        imsep[side] = imsep_loss(x_local, x_all, positive, logit_scale, offset, sem_local, sem_all)
    return ContrastiveTerms(image_to_text, text_to_image, imsep["image"], imsep["text"])


# ------------------------------------------------------------------------------------ contrastive-gap terms
def _pairwise_sq_distances(a: Tensor, b: Tensor) -> Tensor:
    """||a_i - b_j||^2 as |a_i|^2 + |b_j|^2 - 2 a_i . b_j (one n x N matrix, never an n x N x d tensor)."""
    sq = (a * a).sum(1, keepdim=True) + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return sq.clamp_min(0.0)


def _log_mean_exp_off_diagonal(x_local: Tensor, y_all: Tensor, offset: int,
                               all_reduce: Optional[Callable[[Tensor], Tensor]]) -> Tensor:
    """log mean_{i != j} exp(-2 ||x_i - y_j||^2) over the GLOBAL batch.

    This rank sums its rows i against all columns j != i; ``all_reduce`` (with gradient) adds the other ranks'
    partial sums before the log, because a mean of per-rank logs is a different loss. The kernel values lie in
    [e^-8, 1] for unit vectors, so a plain sum is safe without a log-sum-exp shift.
    """
    n, total = x_local.shape[0], y_all.shape[0]
    kernel = torch.exp(-2.0 * _pairwise_sq_distances(x_local, y_all))
    off_diagonal = torch.ones_like(kernel, dtype=torch.bool)
    off_diagonal[torch.arange(n, device=kernel.device), local_labels(n, offset, kernel.device)] = False
    partial = (kernel * off_diagonal).sum()
    if all_reduce is not None:
        partial = all_reduce(partial)
    return torch.log(partial / (total * (total - 1)))


def uniformity(x_local: Tensor, x_all: Tensor, offset: int,
               all_reduce: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """U(X) = log mean_{i != j} exp(-2 ||x_i - x_j||^2) (Fahim et al. eq. 2). Same value on every rank."""
    return _log_mean_exp_off_diagonal(x_local, x_all, offset, all_reduce)


def uniformity_loss(image_local: Tensor, text_local: Tensor, image_all: Tensor, text_all: Tensor, offset: int,
                    all_reduce: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """L_uniform = 1/2 (U(E_v) + U(E_t)) (Fahim et al. eq. 3)."""
    return 0.5 * (uniformity(image_local, image_all, offset, all_reduce)
                  + uniformity(text_local, text_all, offset, all_reduce))


def cross_uniformity_loss(image_local: Tensor, text_all: Tensor, offset: int,
                          all_reduce: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """L_xuniform = log mean_{i != j} exp(-2 ||v_i - t_j||^2) (Fahim et al. eq. 4); local images x all texts
    covers every ordered pair (i, j) once across ranks."""
    return _log_mean_exp_off_diagonal(image_local, text_all, offset, all_reduce)


def alignment_loss(image_local: Tensor, text_local: Tensor) -> Tensor:
    """L_align = mean_i ||v_i - t_i||^2 (Fahim et al. eq. 5, squared); a mean over local rows."""
    return ((image_local - text_local) ** 2).sum(dim=1).mean()


# --------------------------------------------------------------------------------- whole objectives (oracles)
def clip_loss(image_local: Tensor, text_local: Tensor, image_all: Tensor, text_all: Tensor, logit_scale: Tensor,
              offset: int = 0) -> Tensor:
    """L_clip = 1/2 [CE(s P, y) + CE(s P^T, y)] (Eslami & de Melo eq. 4)."""
    i2t, t2i = cross_modal_cross_entropies(image_local, text_local, image_all, text_all, logit_scale, offset)
    return 0.5 * (i2t + t2i)


def alignclip_loss(image_local: Tensor, text_local: Tensor, image_all: Tensor, text_all: Tensor,
                   semantic_local: Optional[Tensor], semantic_all: Optional[Tensor], logit_scale: Tensor,
                   offset: int = 0, *, alpha: float = 1.0, beta: float = 0.5,
                   imsep_sides: tuple[str, ...] = ("image",), imsep_rescale: bool = True) -> Tensor:
    """L = alpha L_CRsep + beta L_IMsep (Eslami & de Melo eq. 13), L_CRsep = CE(sP, y) + CE(sP^T, y) (eq. 12, a sum);
    with both sides, L_IMsep is the sum of the image-side and text-side losses (appendix A.2)."""
    terms = contrastive_terms(image_local, text_local, image_all, text_all, semantic_local, semantic_all,
                              logit_scale, offset, imsep_sides=imsep_sides, imsep_rescale=imsep_rescale)
    imsep = sum(t for t in (terms.imsep_image, terms.imsep_text) if t is not None)
    return alpha * (terms.image_to_text + terms.text_to_image) + beta * imsep


def cua_loss(image_local: Tensor, text_local: Tensor, image_all: Tensor, text_all: Tensor, logit_scale: Tensor,
             offset: int = 0, all_reduce: Optional[Callable[[Tensor], Tensor]] = None,
             cross_uniform: bool = False) -> Tensor:
    """L_CUA = L_clip + L_uniform + L_align; with ``cross_uniform`` L_CUAXU = L_CUA + L_xuniform (Fahim et al.,
    section 4: their eq. 1 + 3 + 5, and + 4)."""
    loss = (clip_loss(image_local, text_local, image_all, text_all, logit_scale, offset)
            + uniformity_loss(image_local, text_local, image_all, text_all, offset, all_reduce)
            + alignment_loss(image_local, text_local))
    if cross_uniform:
        loss = loss + cross_uniformity_loss(image_local, text_all, offset, all_reduce)
    return loss
