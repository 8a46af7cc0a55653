"""Chunked CLIP + IMSep cross-entropies in O(b d + tile^2) memory (docs/performance.md).

Entry points: ``contrastive_terms(...)`` (what ``loss.impl=chunked`` calls), the signature of
``alignclip.losses.dense.contrastive_terms`` plus the keyword ``chunk_size`` (``loss.chunk_size``, the tile edge);
``auto_cpu_contrastive_terms(...)`` (``loss.impl=auto`` off CUDA): dense while one tile holds the whole batch,
chunked above.

Every term is a row-wise cross-entropy over a logit matrix L = s R in the gathered layout (local rows x global
columns, the positive of row i in column ``offset + i``):

    CLIP image->text   R_ij = v_i . t_j                           (Eslami & de Melo, ICLR 2025, arXiv:2406.17639, eq. 2)
    CLIP text->image   R_ij = t_i . v_j                           (eq. 3, rows of P^T for the local texts)
    IMSep, one side    R_ij = (x_i . x_j)(1 - e_i . e_j),  R_{i,offset+i} = v_i . t_i   (eq. 7-11)
                       (x = E_v or E_t, e = E_s; D = 1 without rescaling)

CE_i = LSE_j(L_ij) - L_{i,offset+i}. The forward walks tiles of ``chunk_size`` rows x ``chunk_size`` columns and keeps
a running maximum and a running sum of exp(L - max) per row (never a fixed shift: IMSep logits span s [-2, 2]).
Only the per-row LSE is saved; the backward recomputes each tile (including S from E_s) and forms
G_ij = g_i (softmax_ij - [j = offset + i]), from which

    dx_rows += s (G ⊙ D) x_cols,   dx_cols += s (G ⊙ D)^T x_rows,   ds = sum_ij G_ij R_ij,

with the positive entry's gradient going to the diagonal vector (the IMSep positive v_i . t_i) instead.

Single process (``offset == 0`` and ``*_local is *_all``, which is what the gather returns for one rank), two
shortcuts apply, each computing the same values and gradients with fewer GEMMs:
  - CLIP: one tile of P serves both directions; rows update the image->text LSE, columns the text->image LSE.
  - IMSep: the logit matrix is symmetric (V, S symmetric, the diagonal is a vector), so only tiles with
    column block >= row block are formed; each updates the LSE of its rows and of its columns.

The term assembly (``contrastive_terms_with``) is shared with the Triton backend (``triton_kernels``), which
provides the row-wise primitive only.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import torch
from torch import Tensor

from alignclip.losses import dense
from alignclip.losses.dense import IMSEP_SIDES, ContrastiveTerms


# ------------------------------------------------------------------------------------------------- tile helpers
def _raw_tile(rows: Tensor, cols: Tensor, sem_rows: Optional[Tensor],
              sem_cols: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """(R, D) of one tile: R = (rows cols^T) ⊙ D in fp32 and D = 1 - S (None without rescaling)."""
    acc = _acc_dtype(rows)
    raw = (rows @ cols.T).to(acc)
    if sem_rows is None:
        return raw, None
    sem_rows, sem_cols = sem_rows.to(rows.dtype), sem_cols.to(rows.dtype)
    distance = torch.addmm(sem_rows.new_ones(()), sem_rows, sem_cols.T, alpha=-1.0).to(acc)  # 1 - S  (eq. 8)
    return raw.mul_(distance), distance


def _targets(r0: int, r1: int, c0: int, c1: int, offset: int, device) -> tuple[Tensor, Tensor]:
    """Tile coordinates (row, column) of the positives (i, offset + i) that fall inside rows [r0, r1) x cols [c0, c1)."""
    lo, hi = max(r0, c0 - offset), min(r1, c1 - offset)
    if lo >= hi:
        empty = torch.empty(0, dtype=torch.long, device=device)
        return empty, empty
    i = torch.arange(lo, hi, device=device)
    return i - r0, i + offset - c0


def _online_lse_update(running_max: Tensor, running_sum: Tensor, logits: Tensor, dim: int,
                       consume: bool) -> None:
    """Fold a tile into (max, sum exp(. - max)) along ``dim`` (1: rows, 0: columns). ``consume``: may overwrite
    ``logits``."""
    new_max = torch.maximum(running_max, logits.amax(dim))
    running_sum.mul_(torch.exp(running_max - new_max))  # exp(-inf) = 0 on the first tile
    shift = new_max[:, None] if dim == 1 else new_max[None, :]
    shifted = logits.sub_(shift) if consume else logits - shift
    running_sum.add_(shifted.exp_().sum(dim))
    running_max.copy_(new_max)


def _blocks(total: int, chunk: int):
    return [(start, min(total, start + chunk)) for start in range(0, total, chunk)]


def _check_chunk(chunk_size: int) -> int:
    if int(chunk_size) < 1:
        raise ValueError(f"loss.chunk_size must be >= 1, got {chunk_size}")
    return int(chunk_size)


def _acc_dtype(x: Tensor) -> torch.dtype:
    """Tiles, LSEs and gradient sums are kept in at least fp32 (bf16 features stay bf16 in the GEMMs)."""
    return torch.promote_types(x.dtype, torch.float32)


def _accumulator(x: Tensor) -> Tensor:
    return torch.zeros(x.shape, dtype=_acc_dtype(x), device=x.device)


# ---------------------------------------------------------------------- rectangular: local rows x global columns
class RowCrossEntropy(torch.autograd.Function):
    """CE_i = LSE_j(s R_ij) - s R_{i,offset+i} for the local rows; R as in the module docstring.

    ``positive`` ([n] or None) replaces R_{i,offset+i} (the IMSep diagonal, eq. 10); without it the positive is
    the plain entry of the matrix (CLIP)."""

    @staticmethod
    def forward(ctx, rows: Tensor, cols: Tensor, scale: Tensor, sem_rows: Optional[Tensor],
                sem_cols: Optional[Tensor], positive: Optional[Tensor], offset: int, chunk: int) -> Tensor:
        n, device, acc = rows.shape[0], rows.device, _acc_dtype(rows)
        lse = torch.empty(n, dtype=acc, device=device)
        target = torch.empty(n, dtype=acc, device=device)
        s = scale.to(acc)
        for r0, r1 in _blocks(n, chunk):
            run_max = torch.full((r1 - r0,), float("-inf"), dtype=acc, device=device)
            run_sum = torch.zeros(r1 - r0, dtype=acc, device=device)
            for c0, c1 in _blocks(cols.shape[0], chunk):
                raw, _ = _raw_tile(rows[r0:r1], cols[c0:c1], _sl(sem_rows, r0, r1), _sl(sem_cols, c0, c1))
                ti, tj = _targets(r0, r1, c0, c1, offset, device)
                if positive is not None:
                    raw[ti, tj] = positive[r0 + ti].to(acc)
                logits = raw.mul_(s)
                target[r0 + ti] = logits[ti, tj]
                _online_lse_update(run_max, run_sum, logits, 1, consume=True)
            lse[r0:r1] = run_max + run_sum.log()
        ctx.save_for_backward(rows, cols, scale, sem_rows, sem_cols, positive, lse)
        ctx.offset, ctx.chunk = offset, chunk
        return (lse - target).to(rows.dtype)

    @staticmethod
    def backward(ctx, grad_ce: Tensor):
        rows, cols, scale, sem_rows, sem_cols, positive, lse = ctx.saved_tensors
        offset, chunk, device, acc = ctx.offset, ctx.chunk, rows.device, _acc_dtype(rows)
        s, g = scale.to(acc), grad_ce.to(acc)
        d_rows, d_cols = _accumulator(rows), _accumulator(cols)
        d_pos = torch.zeros(rows.shape[0], dtype=acc, device=device) if positive is not None else None
        d_scale = torch.zeros((), dtype=acc, device=device)
        for r0, r1 in _blocks(rows.shape[0], chunk):
            g_blk = g[r0:r1, None]
            for c0, c1 in _blocks(cols.shape[0], chunk):
                raw, distance = _raw_tile(rows[r0:r1], cols[c0:c1], _sl(sem_rows, r0, r1), _sl(sem_cols, c0, c1))
                ti, tj = _targets(r0, r1, c0, c1, offset, device)
                if positive is not None:
                    raw[ti, tj] = positive[r0 + ti].to(acc)
                grad = (raw * s).sub_(lse[r0:r1, None]).exp_().mul_(g_blk)  # g_i softmax_ij
                grad[ti, tj] -= g[r0 + ti]
                d_scale += torch.dot(grad.view(-1), raw.view(-1))
                grad.mul_(s)
                if positive is not None:
                    d_pos[r0 + ti] = grad[ti, tj]
                    grad[ti, tj] = 0.0  # the positive is not a function of this tile's features
                if distance is not None:
                    grad.mul_(distance)
                grad = grad.to(rows.dtype)
                _accumulate_mm(d_rows[r0:r1], grad, cols[c0:c1])
                _accumulate_mm(d_cols[c0:c1], grad.T, rows[r0:r1])
        return (d_rows.to(rows.dtype), d_cols.to(cols.dtype), d_scale.to(scale.dtype), None, None,
                None if d_pos is None else d_pos.to(positive.dtype), None, None)


def _sl(x: Optional[Tensor], start: int, stop: int) -> Optional[Tensor]:
    return None if x is None else x[start:stop]


# ------------------------------------------------------------------------- single process: the tile walks
def _paired_forward(a: Tensor, b: Tensor, s: Tensor, chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    """(row LSE, column LSE, diagonal) of s a b^T from ONE pass over its tiles: rows give the a->b direction,
    columns the b->a direction (Eslami & de Melo eq. 2-3 with offset 0)."""
    n, device, acc = a.shape[0], a.device, _acc_dtype(a)
    row_max = torch.full((n,), float("-inf"), dtype=acc, device=device)
    col_max = torch.full((n,), float("-inf"), dtype=acc, device=device)
    row_sum, col_sum = torch.zeros(n, dtype=acc, device=device), torch.zeros(n, dtype=acc, device=device)
    target = torch.empty(n, dtype=acc, device=device)
    blocks = _blocks(n, chunk)
    for r0, r1 in blocks:
        for c0, c1 in blocks:
            logits = (a[r0:r1] @ b[c0:c1].T).to(acc).mul_(s)
            if r0 == c0:
                target[r0:r1] = logits.diagonal()
            _online_lse_update(row_max[r0:r1], row_sum[r0:r1], logits, 1, consume=False)
            _online_lse_update(col_max[c0:c1], col_sum[c0:c1], logits, 0, consume=True)
    return row_max + row_sum.log(), col_max + col_sum.log(), target


def _paired_backward(a: Tensor, b: Tensor, s: Tensor, row_lse: Tensor, col_lse: Tensor, g_rows: Tensor,
                     g_cols: Tensor, chunk: int, d_a: Tensor, d_b: Tensor) -> Tensor:
    """Adds the gradients of sum_i g_rows_i CE_rows_i + g_cols_i CE_cols_i into d_a, d_b; returns d/ds."""
    d_scale = torch.zeros((), dtype=d_a.dtype, device=a.device)
    blocks = _blocks(a.shape[0], chunk)
    for r0, r1 in blocks:
        for c0, c1 in blocks:
            logits = (a[r0:r1] @ b[c0:c1].T).to(d_a.dtype).mul_(s)
            grad = (logits - row_lse[r0:r1, None]).exp_().mul_(g_rows[r0:r1, None])
            grad.add_(logits.sub_(col_lse[None, c0:c1]).exp_().mul_(g_cols[None, c0:c1]))
            del logits
            if r0 == c0:
                grad.diagonal().sub_(g_rows[r0:r1] + g_cols[r0:r1])
            grad = grad.mul_(s).to(a.dtype)  # W = s G
            d_scale += _add_product(d_a[r0:r1], grad, b[c0:c1], a[r0:r1]) / s  # sum G R = sum W (a b^T) / s
            _accumulate_mm(d_b[c0:c1], grad.T, a[r0:r1])
    return d_scale


def _accumulate_mm(out: Tensor, mat1: Tensor, mat2: Tensor) -> None:
    """out += mat1 @ mat2. The accumulator is fp32 while bf16 inputs multiply in bf16 (addmm_ wants one dtype)."""
    if out.dtype == mat1.dtype:
        out.addmm_(mat1, mat2)
    else:
        out.add_(mat1 @ mat2)


def _add_product(out: Tensor, weights: Tensor, cols: Tensor, rows: Tensor) -> Tensor:
    """out += weights @ cols; returns sum_ij weights_ij (rows_i . cols_j), read off the product itself, so the
    scale's gradient needs no copy of the raw tile (one tile buffer less at the backward's peak)."""
    product = weights @ cols
    out.add_(product)
    return torch.dot(rows.reshape(-1).to(out.dtype), product.reshape(-1).to(out.dtype))


def _symmetric_forward(x: Tensor, s: Tensor, sem: Optional[Tensor], target: Tensor, chunk: int) -> Tensor:
    """Row LSE of the IMSep logits L_ij = s (x_i . x_j)(1 - S_ij), L_ii = target_i. L is symmetric, so only tiles
    with column block >= row block are formed; each folds into the LSE of its rows and (transposed) its columns."""
    n, device, acc = x.shape[0], x.device, _acc_dtype(x)
    run_max = torch.full((n,), float("-inf"), dtype=acc, device=device)
    run_sum = torch.zeros(n, dtype=acc, device=device)
    blocks = _blocks(n, chunk)
    for bi, (r0, r1) in enumerate(blocks):
        for c0, c1 in blocks[bi:]:
            raw, _ = _raw_tile(x[r0:r1], x[c0:c1], _sl(sem, r0, r1), _sl(sem, c0, c1))
            logits = raw.mul_(s)
            if r0 == c0:
                logits.diagonal().copy_(target[r0:r1])
                _online_lse_update(run_max[r0:r1], run_sum[r0:r1], logits, 1, consume=True)
            else:
                _online_lse_update(run_max[r0:r1], run_sum[r0:r1], logits, 1, consume=False)
                _online_lse_update(run_max[c0:c1], run_sum[c0:c1], logits, 0, consume=True)
    return run_max + run_sum.log()


def _symmetric_backward(x: Tensor, s: Tensor, sem: Optional[Tensor], positive: Tensor, lse: Tensor, g: Tensor,
                        chunk: int, d_x: Tensor, d_pos: Tensor) -> Tensor:
    """Adds the gradient of sum_i g_i CE_i into d_x and d_pos (the diagonal's cosines); returns d/ds.
    x enters L_ij and L_ji through x_i . x_j, hence dx = B x with B = s ((G + G^T) ⊙ D), diagonal excluded; and
    sum_ij B_ij (x_i . x_j) = 2 s sum_{i != j} G_ij R_ij gives the scale's gradient without keeping R."""
    d_scale = torch.zeros((), dtype=d_x.dtype, device=x.device)
    blocks = _blocks(x.shape[0], chunk)
    for bi, (r0, r1) in enumerate(blocks):
        for c0, c1 in blocks[bi:]:
            logits, distance = _raw_tile(x[r0:r1], x[c0:c1], _sl(sem, r0, r1), _sl(sem, c0, c1))
            if r0 == c0:
                logits.diagonal().copy_(positive[r0:r1])
            logits.mul_(s)
            grad = (logits - lse[r0:r1, None]).exp_().mul_(g[r0:r1, None])  # G_ij (row i's softmax)
            if r0 == c0:
                del logits
                grad.diagonal().sub_(g[r0:r1])
                d_scale += torch.dot(grad.diagonal(), positive[r0:r1])  # the diagonal's G_ii R_ii
                d_pos[r0:r1] += grad.diagonal() * s
                grad = grad + grad.T  # G + G^T within the diagonal block
                grad.diagonal().zero_()
            else:
                grad.add_(logits.sub_(lse[None, c0:c1]).exp_().mul_(g[None, c0:c1]))  # + G_ji (column j's)
                del logits
            grad.mul_(s)
            if distance is not None:
                grad.mul_(distance)
                del distance
            grad = grad.to(x.dtype)
            d_scale += _add_product(d_x[r0:r1], grad, x[c0:c1], x[r0:r1]) / (2 * s)
            if r0 != c0:
                d_scale += _add_product(d_x[c0:c1], grad.T, x[r0:r1], x[c0:c1]) / (2 * s)
    return d_scale


class OneBatchCrossEntropies(torch.autograd.Function):
    """Every requested CE of one square batch (offset 0) in one Function, so the backward accumulates into ONE
    gradient buffer per modality (O(b d) memory, not one buffer per term). Returns per-row CEs
    (image->text, text->image, IMSep image, IMSep text); a term that was not requested is an empty tensor."""

    @staticmethod
    def forward(ctx, image: Tensor, text: Tensor, scale: Tensor, semantic: Optional[Tensor], cross_modal: bool,
                sides: tuple[str, ...], chunk: int):
        acc = _acc_dtype(image)
        s = scale.to(acc)
        empty = image.new_zeros(0)
        out = {"image_to_text": empty, "text_to_image": empty, "image": empty, "text": empty}
        lses = {}
        if cross_modal:
            row_lse, col_lse, target = _paired_forward(image, text, s, chunk)
            lses["cross_modal"] = (row_lse, col_lse)
            out["image_to_text"], out["text_to_image"] = (row_lse - target).to(image.dtype), \
                (col_lse - target).to(image.dtype)
        positive = (image * text).sum(dim=1).to(acc)  # diag(P) (eq. 10)
        for side in sides:
            x = image if side == "image" else text
            lses[side] = _symmetric_forward(x, s, semantic, positive * s, chunk)
            out[side] = (lses[side] - positive * s).to(image.dtype)
        ctx.save_for_backward(image, text, scale, semantic, positive, *[t for pair in (
            lses.get("cross_modal", ()), [lses[side] for side in sides]) for t in pair])
        ctx.cross_modal, ctx.sides, ctx.chunk = cross_modal, sides, chunk
        return out["image_to_text"], out["text_to_image"], out["image"], out["text"]

    @staticmethod
    def backward(ctx, g_i2t, g_t2i, g_image, g_text):
        image, text, scale, semantic, positive, *lses = ctx.saved_tensors
        acc = _acc_dtype(image)
        s = scale.to(acc)
        d_image, d_text = _accumulator(image), _accumulator(text)
        d_pos = torch.zeros(image.shape[0], dtype=acc, device=image.device)
        d_scale = torch.zeros((), dtype=acc, device=image.device)
        zeros = torch.zeros(image.shape[0], dtype=acc, device=image.device)
        grad_of = lambda g: zeros if g is None else g.to(acc)  # noqa: E731 (an unused output has no gradient)
        if ctx.cross_modal:
            row_lse, col_lse, *lses = lses
            d_scale += _paired_backward(image, text, s, row_lse, col_lse, grad_of(g_i2t), grad_of(g_t2i),
                                        ctx.chunk, d_image, d_text)
        for side, lse in zip(ctx.sides, lses):
            x, d_x, g = (image, d_image, g_image) if side == "image" else (text, d_text, g_text)
            d_scale += _symmetric_backward(x, s, semantic, positive, lse, grad_of(g), ctx.chunk, d_x, d_pos)
        if ctx.sides:  # positive_i = v_i . t_i
            d_image.addcmul_(d_pos[:, None], text)
            d_text.addcmul_(d_pos[:, None], image)
        return d_image.to(image.dtype), d_text.to(text.dtype), d_scale.to(scale.dtype), None, None, None, None


# ------------------------------------------------------------------------------------------------ the terms
RowCE = Callable[..., Tensor]  # (rows, cols, scale, sem_rows, sem_cols, positive, offset, chunk) -> CE per row


def chunked_row_ce(rows, cols, scale, sem_rows, sem_cols, positive, offset, chunk):
    return RowCrossEntropy.apply(rows, cols, scale, sem_rows, sem_cols, positive, offset, chunk)


def contrastive_terms_with(row_ce: RowCE, image_local: Tensor, text_local: Tensor, image_all: Tensor,
                           text_all: Tensor, semantic_local: Optional[Tensor], semantic_all: Optional[Tensor],
                           logit_scale: Tensor, offset: int, *, cross_modal: bool, imsep_sides: tuple[str, ...],
                           imsep_rescale: bool, chunk_size: int, single_process_shortcuts: bool) -> ContrastiveTerms:
    """The terms of ``dense.contrastive_terms`` computed with the row-wise primitive ``row_ce``; when
    ``single_process_shortcuts`` and the call is a single process's, with ``OneBatchCrossEntropies`` instead."""
    dense.check_imsep_inputs(imsep_sides, imsep_rescale, semantic_local, semantic_all)
    chunk = _check_chunk(chunk_size)
    scale = logit_scale.exp()
    one_batch = single_process_shortcuts and offset == 0 and image_local is image_all and text_local is text_all
    sem_local, sem_all = (semantic_local, semantic_all) if imsep_rescale else (None, None)
    if one_batch:
        # One rank: the gathered semantic rows are the local ones (the no-grad gather detaches a copy).
        ce = OneBatchCrossEntropies.apply(image_all, text_all, scale, sem_all, cross_modal, tuple(imsep_sides), chunk)
        means = [t.mean() if t.numel() else None for t in ce]
        return ContrastiveTerms(*means)
    image_to_text = text_to_image = None
    if cross_modal:
        image_to_text = row_ce(image_local, text_all, scale, None, None, None, offset, chunk).mean()
        text_to_image = row_ce(text_local, image_all, scale, None, None, None, offset, chunk).mean()
    positive = (image_local * text_local).sum(dim=1)  # diag(P) of the local rows (eq. 10)
    imsep = {side: None for side in IMSEP_SIDES}
    for side in imsep_sides:
        x_local, x_all = (image_local, image_all) if side == "image" else (text_local, text_all)
        imsep[side] = row_ce(x_local, x_all, scale, sem_local, sem_all, positive, offset, chunk).mean()
    return ContrastiveTerms(image_to_text, text_to_image, imsep["image"], imsep["text"])


def contrastive_terms(image_local: Tensor, text_local: Tensor, image_all: Tensor, text_all: Tensor,
                      semantic_local: Optional[Tensor], semantic_all: Optional[Tensor], logit_scale: Tensor,
                      offset: int, *, cross_modal: bool = True, imsep_sides: tuple[str, ...] = (),
                      imsep_rescale: bool = True, chunk_size: int = 1024) -> ContrastiveTerms:
    """``dense.contrastive_terms`` (same arguments, same values and gradients) in tiles of ``chunk_size``."""
    return contrastive_terms_with(chunked_row_ce, image_local, text_local, image_all, text_all, semantic_local,
                                  semantic_all, logit_scale, offset, cross_modal=cross_modal,
                                  imsep_sides=imsep_sides, imsep_rescale=imsep_rescale, chunk_size=chunk_size,
                                  single_process_shortcuts=True)


def auto_cpu_contrastive_terms(image_local: Tensor, text_local: Tensor, image_all: Tensor, text_all: Tensor,
                               semantic_local: Optional[Tensor], semantic_all: Optional[Tensor],
                               logit_scale: Tensor, offset: int, *, cross_modal: bool = True,
                               imsep_sides: tuple[str, ...] = (), imsep_rescale: bool = True,
                               chunk_size: int = 1024) -> ContrastiveTerms:
    """``loss.impl=auto`` off CUDA: the dense reference while the global batch fits in one tile (tiling would save
    no memory and only add the backward's recompute), the chunked walk above that (tools/bench_loss.py: at
    b = 2048, chunk 1024, chunked already takes 0.3x dense's memory and about half its time on CPU)."""
    impl = dense.contrastive_terms if image_all.shape[0] <= _check_chunk(chunk_size) else \
        partial(contrastive_terms, chunk_size=chunk_size)
    return impl(image_local, text_local, image_all, text_all, semantic_local, semantic_all, logit_scale, offset,
                cross_modal=cross_modal, imsep_sides=imsep_sides, imsep_rescale=imsep_rescale)
