"""Distil the MLP aligner on cached embeddings (Vu, Balashova & Tran 2024): image -> text space.

    L = w_cos (1 - mean_i cos(f(x_i), y_i)) + w_mse mean_i ||f^(x_i) - y_i||^2 + w_clip L_clip + w_imsep L_IMsep

f^ is f normalised; the CLIP and IMSep terms come from the project's objective (alignclip.losses; Eslami & de Melo
2025, arXiv 2406.17639, eq. 4 and 7-11) on (f^(x), y) with a learnable temperature. IMSep rescales with the
captions' sentence embeddings when given, else with the target text embeddings themselves. Seeded train/validation
split; early stopping on the validation loss keeps the best weights.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from alignclip.aligner.mlp import AlignerShape, MLPAligner
from alignclip.analysis.metrics import as_numpy
from alignclip.config import LossConfig
from alignclip.losses import build_objective

log = logging.getLogger(__name__)


@dataclass
class AlignerTraining:
    cosine_weight: float = 1.0
    mse_weight: float = 0.0
    clip_weight: float = 0.0
    imsep_weight: float = 0.0
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 256
    max_epochs: int = 200
    patience: int = 10  # epochs without a validation improvement before stopping
    val_fraction: float = 0.2
    seed: int = 0
    init_temperature: float = 0.07  # the CLIP / IMSep terms' learnable temperature starts here
    max_logit_scale: float = math.log(100.0)


@dataclass
class AlignerHistory:
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    best_epoch: int = -1
    stopped_early: bool = False


class AlignerObjective(torch.nn.Module):
    def __init__(self, settings: AlignerTraining):
        super().__init__()
        self.s = settings
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1.0 / settings.init_temperature)))
        self.contrastive = None
        if settings.clip_weight > 0 or settings.imsep_weight > 0:
            self.contrastive = build_objective(LossConfig(clip_weight=settings.clip_weight,
                                                          imsep_weight=settings.imsep_weight, impl="dense"))
        if not any(w > 0 for w in (settings.cosine_weight, settings.mse_weight, settings.clip_weight,
                                   settings.imsep_weight)):
            raise ValueError("every aligner loss weight is 0; set at least one of cosine/mse/clip/imsep weights")

    def forward(self, mapped: torch.Tensor, target: torch.Tensor, semantic: torch.Tensor | None) -> torch.Tensor:
        pred, tgt = F.normalize(mapped, dim=-1), F.normalize(target, dim=-1)
        total = mapped.new_zeros(())
        if self.s.cosine_weight:
            total = total + self.s.cosine_weight * (1.0 - (pred * tgt).sum(-1)).mean()
        if self.s.mse_weight:
            total = total + self.s.mse_weight * ((pred - tgt) ** 2).sum(-1).mean()
        if self.contrastive is not None:
            scale = self.logit_scale.clamp(max=self.s.max_logit_scale)
            total = total + self.contrastive(pred, tgt, scale, semantic if semantic is not None else tgt).total
        return total


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(val_fraction * n)))
    return order[n_val:], order[:n_val]


def train_aligner(img, txt, shape: AlignerShape | None = None, settings: AlignerTraining | None = None,
                  semantic=None) -> tuple[MLPAligner, AlignerHistory]:
    """Fit an MLPAligner mapping ``img`` rows onto their paired ``txt`` rows; returns the best (validation) model."""
    settings = settings or AlignerTraining()
    x = torch.from_numpy(as_numpy(img)).float()
    y = torch.from_numpy(as_numpy(txt)).float()
    sem = torch.from_numpy(as_numpy(semantic)).float() if semantic is not None else None
    if x.shape != y.shape:
        raise ValueError(f"aligner training needs paired arrays of one shape, found {tuple(x.shape)} and {tuple(y.shape)}")
    shape = shape or AlignerShape(dim=x.shape[1])
    torch.manual_seed(settings.seed)
    aligner, objective = MLPAligner(shape), AlignerObjective(settings)
    params = list(aligner.parameters()) + list(objective.parameters())
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    train_idx, val_idx = split_indices(len(x), settings.val_fraction, settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    history, best_state, best_val, waited = AlignerHistory(), None, float("inf"), 0

    def batches(idx: np.ndarray, shuffle: bool):
        idx = torch.from_numpy(idx)
        if shuffle:
            idx = idx[torch.randperm(len(idx), generator=generator)]
        for start in range(0, len(idx), settings.batch_size):
            chunk = idx[start:start + settings.batch_size]
            if len(chunk) >= 2:  # a contrastive batch of one has no negatives
                yield x[chunk], y[chunk], (sem[chunk] if sem is not None else None)

    for epoch in range(settings.max_epochs):
        aligner.train()
        losses = []
        for bx, by, bs in batches(train_idx, shuffle=True):
            loss = objective(aligner(bx), by, bs)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        aligner.eval()
        with torch.no_grad():
            val = [objective(aligner(bx), by, bs).item() for bx, by, bs in batches(val_idx, shuffle=False)]
        history.train_loss.append(float(np.mean(losses)) if losses else float("nan"))
        history.val_loss.append(float(np.mean(val)) if val else history.train_loss[-1])
        if history.val_loss[-1] < best_val - 1e-6:
            best_val, waited, history.best_epoch = history.val_loss[-1], 0, epoch
            best_state = {k: v.clone() for k, v in aligner.state_dict().items()}
        else:
            waited += 1
            if waited >= settings.patience:
                history.stopped_early = True
                break
    if best_state is not None:
        aligner.load_state_dict(best_state)
    log.info("aligner: best validation loss %.4f at epoch %d of %d", best_val, history.best_epoch,
             len(history.val_loss))
    return aligner.eval(), history
