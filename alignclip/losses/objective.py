"""The training objective built from the ``loss`` config section (the terms: ``alignclip.losses.dense``
and docs/losses.md).

    total = clip_weight L_clip + crsep_weight L_CRsep + imsep_weight L_IMsep
            + uniform_weight L_uniform + xuniform_weight L_xuniform + align_weight L_align

with one learnable temperature (the model's clamped ``logit_scale``) shared by every term. ``forward`` takes the
LOCAL normalised features, gathers them when a process group with more than one rank is initialised, and returns
``LossOutput(total, terms)``: ``total`` is the one tensor to backpropagate, ``terms`` holds every active term,
detached, for logging. ``terms`` never contains the total (summing it would count the loss twice).

``loss.imsep_start_step`` / ``loss.imsep_ramp_steps`` give IMSep an onset (``Objective.weights_at``): the trainer
passes the optimizer step, so the weight follows the step (and a resumed run) rather than a count of calls.
"""

from __future__ import annotations

import importlib
from functools import partial
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alignclip.config import ConfigError, LossConfig
from alignclip.distributed.gather import (all_gather_no_grad, all_gather_with_grad, all_reduce_sum_with_grad,
                                          rank_and_world)
from alignclip.losses import dense

# loss.impl -> the module that provides ``contrastive_terms`` (same signature as dense.contrastive_terms).
FUSED_MODULES = {"chunked": "alignclip.losses.chunked", "triton": "alignclip.losses.triton_kernels"}


class LossOutput(NamedTuple):
    total: Tensor  # backpropagate this, once
    terms: dict[str, Tensor]  # every active term, detached (the total is not among them)


def _load_fused(impl: str) -> Callable:
    try:
        module = importlib.import_module(FUSED_MODULES[impl])
        return module.contrastive_terms
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"key 'loss.impl' is {impl!r}, but {FUSED_MODULES[impl]}.contrastive_terms is not "
                          f"available ({err}); use loss.impl=dense") from err


def resolve_contrastive_impl(impl: str, device: torch.device, chunk_size: int) -> Callable:
    """The ``contrastive_terms`` function that ``loss.impl`` names. ``auto``: Triton on CUDA (else chunked); on
    CPU ``chunked.auto_cpu_contrastive_terms`` (dense while one tile holds the global batch, chunked above); the
    dense reference when no fused implementation is installed."""
    if impl == "dense":
        return dense.contrastive_terms
    if impl == "auto" and device.type != "cuda":
        try:
            return partial(importlib.import_module(FUSED_MODULES["chunked"]).auto_cpu_contrastive_terms,
                           chunk_size=chunk_size)
        except (ImportError, AttributeError):
            return dense.contrastive_terms
    if impl == "auto":
        for candidate in ("triton", "chunked"):
            try:
                return partial(_load_fused(candidate), chunk_size=chunk_size)
            except ConfigError:
                continue
        return dense.contrastive_terms
    if impl not in FUSED_MODULES:
        raise ConfigError(f"key 'loss.impl' is {impl!r}; expected one of ['dense', 'auto', *{list(FUSED_MODULES)}]")
    return partial(_load_fused(impl), chunk_size=chunk_size)


class Objective(nn.Module):
    def __init__(self, cfg: LossConfig):
        super().__init__()
        self.cfg = cfg
        weights = {"clip": cfg.clip_weight, "crsep": cfg.crsep_weight, "imsep": cfg.imsep_weight,
                   "uniform": cfg.uniform_weight, "xuniform": cfg.xuniform_weight, "align": cfg.align_weight}
        for name, weight in weights.items():
            if weight < 0:
                raise ConfigError(f"key 'loss.{name}_weight' must be >= 0, got {weight}")
        self.weights = {name: float(w) for name, w in weights.items() if w != 0}
        if not self.weights:
            raise ConfigError("every 'loss.*_weight' is 0: the objective would be empty; set e.g. loss.clip_weight=1")
        if cfg.imsep_sides not in ("image", "text", "both"):
            raise ConfigError(f"key 'loss.imsep_sides' is {cfg.imsep_sides!r}; expected image | text | both")
        self.imsep_sides = ("image", "text") if cfg.imsep_sides == "both" else (cfg.imsep_sides,)
        if "imsep" not in self.weights:
            self.imsep_sides = ()
        self.needs_semantic = bool(self.imsep_sides) and cfg.imsep_rescale
        self._impl: Optional[Callable] = None
        if cfg.impl != "auto":  # a named implementation that is missing fails at build time, naming loss.impl
            resolve_contrastive_impl(cfg.impl, torch.device("cpu"), cfg.chunk_size)

    def extra_repr(self) -> str:
        onset = f", imsep from step {self.cfg.imsep_start_step} over {self.cfg.imsep_ramp_steps}" \
            if self.has_onset else ""
        return f"weights={self.weights}, imsep_sides={self.imsep_sides}, rescale={self.cfg.imsep_rescale}, " \
               f"impl={self.cfg.impl}{onset}"

    @property
    def has_onset(self) -> bool:
        return "imsep" in self.weights and bool(self.cfg.imsep_start_step or self.cfg.imsep_ramp_steps)

    def weights_at(self, step: Optional[int]) -> dict[str, float]:
        """The term weights at optimizer step ``step`` (0-based; None: the configured weights). IMSep's is 0
        before ``imsep_start_step`` and reaches ``imsep_weight`` after ``imsep_ramp_steps`` more steps, linearly:
        step start + k - 1 has (k / ramp) of it."""
        if step is None or not self.has_onset:
            return self.weights
        start, ramp = self.cfg.imsep_start_step, self.cfg.imsep_ramp_steps
        share = float(step >= start) if ramp == 0 else min(max((step - start + 1) / ramp, 0.0), 1.0)
        return {**self.weights, "imsep": self.weights["imsep"] * share}

    def forward(self, image_embeds: Tensor, text_embeds: Tensor, logit_scale: Tensor,
                semantic_embeds: Optional[Tensor] = None, step: Optional[int] = None) -> LossOutput:
        """Local, L2-normalised E_v, E_t [n, d]; the clamped log-scale; E_s [n, k] (any norm; normalised here);
        the optimizer step for a scheduled weight (``weights_at``; None: the configured weights).

        Each rank's ``total`` is its share of the global-batch loss: the average over ranks equals the loss of
        the concatenated batch (see alignclip.distributed.gather for the gradient convention)."""
        if self.needs_semantic and semantic_embeds is None:
            raise ValueError("the objective has IMSep with rescaling (loss.imsep_weight > 0, loss.imsep_rescale="
                             "true) but no semantic_embeds were passed: precompute them into the shards, let the "
                             "trainer encode captions online, or set loss.imsep_rescale=false")
        # Low-precision features (bf16 under DeepSpeed) are promoted: the b x b softmaxes are computed in fp32.
        compute_dtype = torch.promote_types(image_embeds.dtype, torch.float32)
        image_local, text_local = image_embeds.to(compute_dtype), text_embeds.to(compute_dtype)
        logit_scale = logit_scale.to(compute_dtype).reshape(())  # a [] or [1] parameter: one scalar for all terms
        rank, world = rank_and_world()
        offset = rank * image_local.shape[0]
        image_all, text_all = all_gather_with_grad(image_local), all_gather_with_grad(text_local)
        semantic_local = semantic_all = None
        if self.needs_semantic:
            semantic_local = F.normalize(semantic_embeds.detach().to(compute_dtype), dim=-1)  # S_ii = 1 (eq. 8)
            semantic_all = all_gather_no_grad(semantic_local)
        all_reduce = all_reduce_sum_with_grad if world > 1 else None

        w, terms = self.weights, {}
        cross_modal = "clip" in w or "crsep" in w
        if cross_modal or self.imsep_sides:
            if self._impl is None:
                self._impl = resolve_contrastive_impl(self.cfg.impl, image_local.device, self.cfg.chunk_size)
            ce = self._impl(image_local, text_local, image_all, text_all, semantic_local, semantic_all,
                            logit_scale, offset, cross_modal=cross_modal, imsep_sides=self.imsep_sides,
                            imsep_rescale=self.cfg.imsep_rescale)
            if cross_modal:
                crsep = ce.image_to_text + ce.text_to_image  # eq. 12
                if "clip" in w:
                    terms["clip"] = 0.5 * crsep  # eq. 4
                if "crsep" in w:
                    terms["crsep"] = crsep
            if self.imsep_sides:
                sides = {f"imsep_{side}": getattr(ce, f"imsep_{side}") for side in self.imsep_sides}
                terms["imsep"] = sum(sides.values())  # both sides: the sum (appendix A.2)
                if len(sides) > 1:
                    terms.update(sides)  # logged only; not weighted separately
        if "uniform" in w:
            terms["uniform"] = dense.uniformity_loss(image_local, text_local, image_all, text_all, offset, all_reduce)
        if "xuniform" in w:
            terms["xuniform"] = dense.cross_uniformity_loss(image_local, text_all, offset, all_reduce)
        if "align" in w:
            terms["align"] = dense.alignment_loss(image_local, text_local)

        total = sum(weight * terms[name] for name, weight in self.weights_at(step).items())
        return LossOutput(total, {name: value.detach() for name, value in terms.items()})


def build_objective(loss_cfg: LossConfig) -> Objective:
    """The objective of a ``loss`` config section (see configs/loss/ for the recipes)."""
    return Objective(loss_cfg)
