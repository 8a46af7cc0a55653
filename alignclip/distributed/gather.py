"""The project's one gather: features across ranks, with or without gradient.

Gradient convention (every loss in ``alignclip.losses`` follows it): every rank's loss is a mean over its own rows
against all gathered columns, so the global-batch loss is the AVERAGE over ranks of the per-rank losses.
``all_gather_with_grad``'s backward SUMS the gradients that all ranks send to a slice, so a rank's feature gradient
is W x the gradient of the global-batch loss; DeepSpeed's averaging of parameter gradients over the W ranks then
gives exactly the global-batch gradient. Parameters that enter the loss directly on every rank (the logit scale)
get the per-rank gradient, whose average over ranks is again the global one.

Every function is the identity when torch.distributed is not initialised or the world has one rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from alignclip.distributed.process import rank_and_world


def _gather(x: Tensor) -> Tensor:
    _, world = rank_and_world()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.rank, _ = rank_and_world()
        ctx.rows = x.shape[0]
        return _gather(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        # Every rank's loss depends on every slice: sum the gradients of all ranks, keep this rank's slice.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad.narrow(0, ctx.rank * ctx.rows, ctx.rows)


class _AllReduceSumWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        # y = sum_r x_r on every rank, and every rank's loss uses y: dx_r = sum over ranks of dy.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` [n, ...] from all ranks in rank order -> [W * n, ...]; gradients flow back to each rank's
    slice, summed over ranks. Every rank must pass the same shape."""
    if rank_and_world()[1] == 1:
        return x
    return _AllGatherWithGrad.apply(x)


def all_gather_no_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from all ranks without a gradient path (the semantic embeddings E_s)."""
    if rank_and_world()[1] == 1:
        return x.detach()
    with torch.no_grad():
        return _gather(x.detach())


def all_reduce_sum_with_grad(x: Tensor) -> Tensor:
    """Sum ``x`` over ranks, keeping the gradient (partial sums of the uniformity terms before their log)."""
    if rank_and_world()[1] == 1:
        return x
    return _AllReduceSumWithGrad.apply(x)
