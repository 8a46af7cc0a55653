"""Triton kernels for the CLIP + IMSep cross-entropies (docs/performance.md), behind the chunked interface.

Entry point (what ``loss.impl=triton`` calls): ``contrastive_terms(...)``, the signature of
``alignclip.losses.dense.contrastive_terms`` plus the keyword ``chunk_size`` (unused here: the tile shape is the
kernels' block sizes). The term assembly is ``chunked.contrastive_terms_with``; this module supplies its row-wise
primitive CE_i = LSE_j(s R_ij) - s R_{i,offset+i} (R as in ``alignclip.losses.chunked``) as three kernels:

  forward      one program per block of rows walks all column blocks: R from a K-loop of tl.dot over the
               features (and S over E_s when rescaling), the IMSep positive set on (i, offset + i), an online
               log-sum-exp with a running maximum. Writes the LSE and the positive logit per row: O(b) output.
  backward     two programs, each recomputing the logit tiles from the saved LSE: one per row block writes
               d rows (plus the positive's and the scale's per-row gradient), one per column block writes
               d columns. Every output block belongs to one program: no atomics, deterministic.

Memory: the inputs, O(b d) gradients and O(b) statistics; nothing b x b.

On CPU the kernels run under Triton's interpreter: TRITON_INTERPRET=1 must be set before ``triton`` is imported
(``triton.jit`` reads it when it decorates). The interpreter is exact in fp32 only (its bf16 dot is wrong), so
CPU tests use fp32; bf16 is a CUDA-only check.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from alignclip.losses.chunked import contrastive_terms_with
from alignclip.losses.dense import ContrastiveTerms

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# Block sizes (rows, columns, feature chunk). tl.dot needs >= 16; the interpreter is faster with small blocks.
BLOCK_ROWS, BLOCK_COLS, BLOCK_FEATURES = (16, 16, 32) if INTERPRETED else (64, 64, 64)


@triton.jit
def _dot_tile(a_ptr, b_ptr, a_idx, b_idx, a_mask, b_mask, width, stride_a, stride_b,
              BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, PRECISION: tl.constexpr):
    """[BM, BN] tile of A B^T, accumulated in fp32 over feature chunks of BD."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for d0 in range(0, width, BD):
        offs = d0 + tl.arange(0, BD)
        in_width = offs < width
        a = tl.load(a_ptr + a_idx[:, None] * stride_a + offs[None, :], mask=a_mask[:, None] & in_width[None, :],
                    other=0.0)
        b = tl.load(b_ptr + b_idx[:, None] * stride_b + offs[None, :], mask=b_mask[:, None] & in_width[None, :],
                    other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _raw_tile(rows_ptr, cols_ptr, sem_r_ptr, sem_c_ptr, r_idx, c_idx, r_mask, c_mask, width, sem_width,
              stride_r, stride_c, stride_sr, stride_sc, HAS_SEM: tl.constexpr,
              BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, PRECISION: tl.constexpr):
    """(R, D): R = (rows cols^T) ⊙ D and D = 1 - S (ones without rescaling), eq. 7-9."""
    raw = _dot_tile(rows_ptr, cols_ptr, r_idx, c_idx, r_mask, c_mask, width, stride_r, stride_c, BM, BN, BD,
                    PRECISION)
    distance = tl.full((BM, BN), 1.0, tl.float32)
    if HAS_SEM:
        distance = 1.0 - _dot_tile(sem_r_ptr, sem_c_ptr, r_idx, c_idx, r_mask, c_mask, sem_width, stride_sr,
                                   stride_sc, BM, BN, BD, PRECISION)
        raw = raw * distance
    return raw, distance


@triton.jit
def _row_ce_forward(rows_ptr, cols_ptr, sem_r_ptr, sem_c_ptr, pos_ptr, scale_ptr, lse_ptr, target_ptr,
                    n_rows, n_cols, width, sem_width, offset, stride_r, stride_c, stride_sr, stride_sc,
                    HAS_SEM: tl.constexpr, HAS_POS: tl.constexpr, PRECISION: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    r_idx = tl.program_id(0) * BM + tl.arange(0, BM)
    r_mask = r_idx < n_rows
    s = tl.load(scale_ptr).to(tl.float32)
    positive = tl.zeros((BM,), dtype=tl.float32)
    if HAS_POS:
        positive = tl.load(pos_ptr + r_idx, mask=r_mask, other=0.0).to(tl.float32)
    run_max = tl.full((BM,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BM,), dtype=tl.float32)
    target = tl.zeros((BM,), dtype=tl.float32)
    for c0 in range(0, n_cols, BN):
        c_idx = c0 + tl.arange(0, BN)
        c_mask = c_idx < n_cols
        raw, distance = _raw_tile(rows_ptr, cols_ptr, sem_r_ptr, sem_c_ptr, r_idx, c_idx, r_mask, c_mask, width,
                                  sem_width, stride_r, stride_c, stride_sr, stride_sc, HAS_SEM, BM, BN, BD,
                                  PRECISION)
        is_target = c_idx[None, :] == (r_idx[:, None] + offset)
        if HAS_POS:
            raw = tl.where(is_target, positive[:, None], raw)  # eq. 10: the diagonal is set, not rescaled
        logits = tl.where(c_mask[None, :], raw * s, float("-inf"))
        target += tl.sum(tl.where(is_target, logits, 0.0), axis=1)
        new_max = tl.maximum(run_max, tl.max(logits, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
        run_max = new_max
    tl.store(lse_ptr + r_idx, run_max + tl.log(run_sum), mask=r_mask)
    tl.store(target_ptr + r_idx, target, mask=r_mask)


@triton.jit
def _logit_gradient_tile(rows_ptr, cols_ptr, sem_r_ptr, sem_c_ptr, positive, lse, g, s, r_idx, c_idx, r_mask,
                         c_mask, width, sem_width, offset, stride_r, stride_c, stride_sr, stride_sc,
                         HAS_SEM: tl.constexpr, HAS_POS: tl.constexpr, PRECISION: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    """Recompute a tile; return (W, G ⊙ R summed per row, s G on the positive per row) with
    G = g (softmax - onehot) and W = s G ⊙ D (zero on the IMSep positive, which is not a function of the tile)."""
    raw, distance = _raw_tile(rows_ptr, cols_ptr, sem_r_ptr, sem_c_ptr, r_idx, c_idx, r_mask, c_mask, width,
                              sem_width, stride_r, stride_c, stride_sr, stride_sc, HAS_SEM, BM, BN, BD, PRECISION)
    is_target = c_idx[None, :] == (r_idx[:, None] + offset)
    if HAS_POS:
        raw = tl.where(is_target, positive[:, None], raw)
    valid = r_mask[:, None] & c_mask[None, :]
    prob = tl.exp(tl.where(valid, raw * s - lse[:, None], float("-inf")))  # padding -> 0, never exp(+large)
    grad = g[:, None] * (prob - tl.where(is_target & valid, 1.0, 0.0))
    scale_part = tl.sum(grad * raw, axis=1)
    weighted = grad * s
    positive_part = tl.zeros((BM,), dtype=tl.float32)
    if HAS_POS:
        positive_part = tl.sum(tl.where(is_target, weighted, 0.0), axis=1)
        weighted = tl.where(is_target, 0.0, weighted)
    return weighted * distance, scale_part, positive_part


@triton.jit
def _row_ce_backward_rows(rows_ptr, cols_ptr, sem_r_ptr, sem_c_ptr, pos_ptr, scale_ptr, lse_ptr, grad_ptr,
                          d_rows_ptr, d_pos_ptr, d_scale_ptr, n_rows, n_cols, width, sem_width, offset,
                          stride_r, stride_c, stride_sr, stride_sc, HAS_SEM: tl.constexpr, HAS_POS: tl.constexpr,
                          PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    r_idx = tl.program_id(0) * BM + tl.arange(0, BM)
    r_mask = r_idx < n_rows
    s = tl.load(scale_ptr).to(tl.float32)
    lse = tl.load(lse_ptr + r_idx, mask=r_mask, other=0.0)
    g = tl.load(grad_ptr + r_idx, mask=r_mask, other=0.0).to(tl.float32)
    positive = tl.zeros((BM,), dtype=tl.float32)
    if HAS_POS:
        positive = tl.load(pos_ptr + r_idx, mask=r_mask, other=0.0).to(tl.float32)
    d_scale = tl.zeros((BM,), dtype=tl.float32)
    d_pos = tl.zeros((BM,), dtype=tl.float32)
    for c0 in range(0, n_cols, BN):
        c_idx = c0 + tl.arange(0, BN)
        c_mask = c_idx < n_cols
        weighted, scale_part, positive_part = _logit_gradient_tile(
            rows_ptr, cols_ptr, sem_r_ptr, sem_c_ptr, positive, lse, g, s, r_idx, c_idx, r_mask, c_mask, width,
            sem_width, offset, stride_r, stride_c, stride_sr, stride_sc, HAS_SEM, HAS_POS, PRECISION, BM, BN, BD)
        d_scale += scale_part
        d_pos += positive_part
        for d0 in range(0, width, BD):  # d rows[block] += W cols[tile]; the block is this program's alone
            offs = d0 + tl.arange(0, BD)
            in_width = offs < width
            cols = tl.load(cols_ptr + c_idx[:, None] * stride_c + offs[None, :],
                           mask=c_mask[:, None] & in_width[None, :], other=0.0)
            update = tl.dot(weighted.to(cols.dtype), cols, input_precision=PRECISION)
            out = d_rows_ptr + r_idx[:, None] * width + offs[None, :]
            out_mask = r_mask[:, None] & in_width[None, :]
            tl.store(out, tl.load(out, mask=out_mask, other=0.0) + update, mask=out_mask)
    tl.store(d_scale_ptr + r_idx, d_scale, mask=r_mask)
    tl.store(d_pos_ptr + r_idx, d_pos, mask=r_mask)


@triton.jit
def _row_ce_backward_cols(rows_ptr, cols_ptr, sem_r_ptr, sem_c_ptr, pos_ptr, scale_ptr, lse_ptr, grad_ptr,
                          d_cols_ptr, n_rows, n_cols, width, sem_width, offset,
                          stride_r, stride_c, stride_sr, stride_sc, HAS_SEM: tl.constexpr, HAS_POS: tl.constexpr,
                          PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    c_idx = tl.program_id(0) * BN + tl.arange(0, BN)
    c_mask = c_idx < n_cols
    s = tl.load(scale_ptr).to(tl.float32)
    for r0 in range(0, n_rows, BM):
        r_idx = r0 + tl.arange(0, BM)
        r_mask = r_idx < n_rows
        lse = tl.load(lse_ptr + r_idx, mask=r_mask, other=0.0)
        g = tl.load(grad_ptr + r_idx, mask=r_mask, other=0.0).to(tl.float32)
        positive = tl.zeros((BM,), dtype=tl.float32)
        if HAS_POS:
            positive = tl.load(pos_ptr + r_idx, mask=r_mask, other=0.0).to(tl.float32)
        weighted, _, _ = _logit_gradient_tile(
            rows_ptr, cols_ptr, sem_r_ptr, sem_c_ptr, positive, lse, g, s, r_idx, c_idx, r_mask, c_mask, width,
            sem_width, offset, stride_r, stride_c, stride_sr, stride_sc, HAS_SEM, HAS_POS, PRECISION, BM, BN, BD)
        for d0 in range(0, width, BD):  # d cols[block] += W^T rows[tile]; the block is this program's alone
            offs = d0 + tl.arange(0, BD)
            in_width = offs < width
            rows = tl.load(rows_ptr + r_idx[:, None] * stride_r + offs[None, :],
                           mask=r_mask[:, None] & in_width[None, :], other=0.0)
            update = tl.dot(tl.trans(weighted).to(rows.dtype), rows, input_precision=PRECISION)
            out = d_cols_ptr + c_idx[:, None] * width + offs[None, :]
            out_mask = c_mask[:, None] & in_width[None, :]
            tl.store(out, tl.load(out, mask=out_mask, other=0.0) + update, mask=out_mask)


def _precision(x: Tensor) -> str:
    # fp32 features: exact fp32 products (no TF32), as the dense oracle; bf16 uses the tensor cores natively.
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _launch_args(rows, cols, sem_rows, sem_cols):
    has_sem = sem_rows is not None
    sem_rows = sem_rows.to(rows.dtype).contiguous() if has_sem else rows
    sem_cols = sem_cols.to(rows.dtype).contiguous() if has_sem else cols
    return sem_rows, sem_cols, has_sem


class TritonRowCrossEntropy(torch.autograd.Function):
    """``chunked.RowCrossEntropy`` (same inputs, outputs and gradients) with the tile walks as Triton kernels."""

    @staticmethod
    def forward(ctx, rows: Tensor, cols: Tensor, scale: Tensor, sem_rows: Optional[Tensor],
                sem_cols: Optional[Tensor], positive: Optional[Tensor], offset: int, chunk: int) -> Tensor:
        if rows.device.type != "cuda" and not INTERPRETED:
            raise RuntimeError("loss.impl=triton needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is "
                               "imported, for tests); use loss.impl=chunked on CPU")
        rows, cols = rows.contiguous(), cols.contiguous()
        sem_r, sem_c, has_sem = _launch_args(rows, cols, sem_rows, sem_cols)
        has_pos = positive is not None
        pos = positive.contiguous() if has_pos else rows
        scale_f = scale.detach().float().reshape(1)
        n, n_cols, width = rows.shape[0], cols.shape[0], rows.shape[1]
        lse = torch.empty(n, dtype=torch.float32, device=rows.device)
        target = torch.empty(n, dtype=torch.float32, device=rows.device)
        _row_ce_forward[(triton.cdiv(n, BLOCK_ROWS),)](
            rows, cols, sem_r, sem_c, pos, scale_f, lse, target, n, n_cols, width, sem_r.shape[1], offset,
            rows.stride(0), cols.stride(0), sem_r.stride(0), sem_c.stride(0), HAS_SEM=has_sem, HAS_POS=has_pos,
            PRECISION=_precision(rows), BM=BLOCK_ROWS, BN=BLOCK_COLS, BD=BLOCK_FEATURES)
        ctx.save_for_backward(rows, cols, scale, sem_r, sem_c, pos, lse)
        ctx.offset, ctx.has_sem, ctx.has_pos = offset, has_sem, has_pos
        return (lse - target).to(rows.dtype)

    @staticmethod
    def backward(ctx, grad_ce: Tensor):
        rows, cols, scale, sem_r, sem_c, pos, lse = ctx.saved_tensors
        n, n_cols, width = rows.shape[0], cols.shape[0], rows.shape[1]
        device = rows.device
        g = grad_ce.float().contiguous()
        scale_f = scale.detach().float().reshape(1)
        d_rows = torch.zeros(n, width, dtype=torch.float32, device=device)
        d_cols = torch.zeros(n_cols, width, dtype=torch.float32, device=device)
        d_pos = torch.zeros(n, dtype=torch.float32, device=device)
        d_scale = torch.zeros(n, dtype=torch.float32, device=device)
        common = dict(HAS_SEM=ctx.has_sem, HAS_POS=ctx.has_pos, PRECISION=_precision(rows), BM=BLOCK_ROWS,
                      BN=BLOCK_COLS, BD=BLOCK_FEATURES)
        strides = (rows.stride(0), cols.stride(0), sem_r.stride(0), sem_c.stride(0))
        _row_ce_backward_rows[(triton.cdiv(n, BLOCK_ROWS),)](
            rows, cols, sem_r, sem_c, pos, scale_f, lse, g, d_rows, d_pos, d_scale, n, n_cols, width,
            sem_r.shape[1], ctx.offset, *strides, **common)
        _row_ce_backward_cols[(triton.cdiv(n_cols, BLOCK_COLS),)](
            rows, cols, sem_r, sem_c, pos, scale_f, lse, g, d_cols, n, n_cols, width, sem_r.shape[1], ctx.offset,
            *strides, **common)
        return (d_rows.to(rows.dtype), d_cols.to(cols.dtype), d_scale.sum().to(scale.dtype), None, None,
                d_pos.to(pos.dtype) if ctx.has_pos else None, None, None)


def triton_row_ce(rows, cols, scale, sem_rows, sem_cols, positive, offset, chunk):
    return TritonRowCrossEntropy.apply(rows, cols, scale, sem_rows, sem_cols, positive, offset, chunk)


def contrastive_terms(image_local: Tensor, text_local: Tensor, image_all: Tensor, text_all: Tensor,
                      semantic_local: Optional[Tensor], semantic_all: Optional[Tensor], logit_scale: Tensor,
                      offset: int, *, cross_modal: bool = True, imsep_sides: tuple[str, ...] = (),
                      imsep_rescale: bool = True, chunk_size: int = 1024) -> ContrastiveTerms:
    """``dense.contrastive_terms`` (same arguments, same values and gradients) with the Triton kernels."""
    return contrastive_terms_with(triton_row_ce, image_local, text_local, image_all, text_all, semantic_local,
                                  semantic_all, logit_scale, offset, cross_modal=cross_modal,
                                  imsep_sides=imsep_sides, imsep_rescale=imsep_rescale, chunk_size=chunk_size,
                                  single_process_shortcuts=False)
