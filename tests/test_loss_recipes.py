"""The loss recipes in configs/loss/: each sets the weights it documents, stacks over any model config, and the
published-reference-code recipe computes what that code computes (its formula rewritten here in float64)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from alignclip.config import CONFIG_DIR, load_config
from alignclip.losses import build_objective, dense

WEIGHT_KEYS = ("clip_weight", "crsep_weight", "imsep_weight", "uniform_weight", "xuniform_weight", "align_weight")
# recipe -> (non-zero weights, imsep_sides, imsep_rescale)
EXPECTED = {
    "clip": ({"clip_weight": 1.0}, None, None),
    "alignclip": ({"crsep_weight": 1.0, "imsep_weight": 0.5}, "image", True),
    "alignclip_text_side": ({"crsep_weight": 1.0, "imsep_weight": 0.5}, "text", True),
    "alignclip_both_sides": ({"crsep_weight": 1.0, "imsep_weight": 0.5}, "both", True),
    "alignclip_no_rescale": ({"crsep_weight": 1.0, "imsep_weight": 0.5}, "image", False),
    "alignclip_reference_code": ({"crsep_weight": 2.0, "imsep_weight": 1.0}, "both", True),
    "cua": ({"clip_weight": 1.0, "uniform_weight": 1.0, "align_weight": 1.0}, None, None),
    "cuaxu": ({"clip_weight": 1.0, "uniform_weight": 1.0, "align_weight": 1.0, "xuniform_weight": 1.0}, None, None),
}


def _experiment(tmp_path: Path, model: str, recipe: str) -> Path:
    """A config of ``model`` (a file under configs/, e.g. model/clip_tiny) followed by the loss recipe."""
    path = tmp_path / f"{model.replace('/', '-')}+{recipe}.yaml"
    path.write_text(f"defaults: [{CONFIG_DIR / model}.yaml, {CONFIG_DIR / 'loss' / recipe}.yaml]\n")
    return path


def test_every_recipe_file_is_listed_here():
    assert sorted(p.stem for p in (CONFIG_DIR / "loss").glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("recipe", sorted(EXPECTED))
@pytest.mark.parametrize("model", ["model/alignclip_tiny", "model/clip_tiny", "experiment/embedded_default"])
def test_recipe_sets_every_weight_whatever_the_model_config_said(tmp_path, model, recipe):
    """Stacked after alignclip_tiny (which turns on CRsep + IMSep) a CLIP or CUA recipe must switch them off, and
    after the embedded default (whose IMSep has an onset) every recipe is itself, with no onset."""
    loss = load_config(_experiment(tmp_path, model, recipe)).loss
    weights, sides, rescale = EXPECTED[recipe]
    assert {k: getattr(loss, k) for k in WEIGHT_KEYS} == {k: weights.get(k, 0.0) for k in WEIGHT_KEYS}
    assert (loss.imsep_start_step, loss.imsep_ramp_steps) == (0, 0)  # none has an IMSep onset
    if sides is not None:
        assert (loss.imsep_sides, loss.imsep_rescale) == (sides, rescale)


def test_paper_model_configs_use_the_paper_recipe():
    for name in ("model/alignclip_vit_b16", "model/alignclip_tiny"):
        loss = load_config(name).loss
        assert (loss.crsep_weight, loss.imsep_weight, loss.imsep_sides, loss.imsep_rescale, loss.clip_weight) == \
            (1.0, 0.5, "image", True, 0.0)
        assert (loss.imsep_start_step, loss.imsep_ramp_steps) == (0, 0)  # IMSep from the first step
    assert load_config("model/alignclip_vit_b16").loss.semantic_model == "sentence-transformers/all-mpnet-base-v2"


def _published_code_loss(v, t, sem, scale, alpha=1.0, beta=0.5):
    """The published AlignCLIP training code's backpropagated value with --separate_text --separate_image
    --nl_semantic_supervision, rewritten: its loss returns total = alpha * crsep + beta * (CE_text + CE_image)
    next to its two parts, and its train loop backpropagates the sum of the three, i.e. twice the total.
    Its rescaled matrices are (X X^T) * (1 - S) + diag(V T^T) with S from the row-normalised sentence embeddings."""
    n = v.shape[0]
    eye = torch.eye(n, dtype=v.dtype)
    labels = torch.arange(n)
    sem = sem / sem.norm(dim=-1, keepdim=True)
    one_minus_s = 1 - sem @ sem.T
    paired = (v @ t.T) * eye
    image_side = (v @ v.T) * one_minus_s + paired
    text_side = (t @ t.T) * one_minus_s + paired
    in_modality = beta * (F.cross_entropy(scale * text_side, labels) + F.cross_entropy(scale * image_side, labels))
    cross = alpha * (F.cross_entropy(scale * v @ t.T, labels) + F.cross_entropy(scale * t @ v.T, labels))
    total = in_modality + cross
    return total + cross + in_modality  # sum(losses.values()) over {total, clip, inModality}


def test_reference_code_recipe_equals_the_published_code_formula(tmp_path):
    gen = torch.Generator().manual_seed(3)
    v = F.normalize(torch.randn(6, 5, generator=gen, dtype=torch.float64), dim=-1)
    t = F.normalize(torch.randn(6, 5, generator=gen, dtype=torch.float64), dim=-1)
    sem = torch.randn(6, 7, generator=gen, dtype=torch.float64)
    log_scale = torch.tensor(math.log(4.0), dtype=torch.float64)
    cfg = load_config(_experiment(tmp_path, "model/sharedclip_tiny", "alignclip_reference_code")).loss
    cfg.impl = "dense"
    ours = build_objective(cfg)(v, t, log_scale, sem).total
    theirs = _published_code_loss(v, t, sem, 4.0)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-10)
    # and the paper's recipe is a different loss on the same batch (image side only, not doubled)
    cfg = load_config("model/alignclip_tiny").loss
    cfg.impl = "dense"
    assert build_objective(cfg)(v, t, log_scale, sem).total.item() < 0.6 * theirs.item()


# ----------------------------------------------------------------------------------------- the IMSep onset
@pytest.mark.parametrize("start, ramp, expected", [
    (3, 4, [0, 0, 0, 0.125, 0.25, 0.375, 0.5, 0.5, 0.5]),
    (3, 0, [0, 0, 0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]),
    (0, 2, [0.25, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]),
])
def test_imsep_onset_weights_by_step(start, ramp, expected):
    cfg = load_config("model/alignclip_tiny", [f"loss.imsep_start_step={start}", f"loss.imsep_ramp_steps={ramp}"])
    objective = build_objective(cfg.loss)
    assert [objective.weights_at(step)["imsep"] for step in range(9)] == expected
    assert all(objective.weights_at(step)["crsep"] == 1.0 for step in range(9))
    assert objective.weights_at(None) == {"crsep": 1.0, "imsep": 0.5}  # no step: the configured weights


def test_the_onset_weights_the_imsep_term_of_the_total_and_its_gradient():
    gen = torch.Generator().manual_seed(5)
    v0 = F.normalize(torch.randn(6, 5, generator=gen, dtype=torch.float64), dim=-1)
    t0 = F.normalize(torch.randn(6, 5, generator=gen, dtype=torch.float64), dim=-1)
    sem = torch.randn(6, 7, generator=gen, dtype=torch.float64)
    log_scale = torch.tensor(math.log(10.0), dtype=torch.float64)
    cfg = load_config("model/alignclip_tiny", ["loss.impl=dense", "loss.imsep_start_step=2",
                                               "loss.imsep_ramp_steps=4"]).loss
    objective = build_objective(cfg)
    for step, share in [(0, 0.0), (1, 0.0), (2, 0.25), (4, 0.75), (9, 1.0), (None, 1.0)]:
        v, t = v0.clone().requires_grad_(), t0.clone().requires_grad_()
        out = objective(v, t, log_scale, sem, step=step)
        assert out.total.item() == pytest.approx((out.terms["crsep"] + 0.5 * share * out.terms["imsep"]).item(),
                                                 rel=1e-12)
        out.total.backward()
        # the reference: the same sum built from the dense terms directly
        v_ref, t_ref = v0.clone().requires_grad_(), t0.clone().requires_grad_()
        terms = dense.contrastive_terms(v_ref, t_ref, v_ref, t_ref, F.normalize(sem, dim=-1),
                                        F.normalize(sem, dim=-1), log_scale, 0, cross_modal=True,
                                        imsep_sides=("image",), imsep_rescale=True)
        (terms.image_to_text + terms.text_to_image + 0.5 * share * terms.imsep_image).backward()
        assert torch.allclose(v.grad, v_ref.grad, rtol=1e-10, atol=1e-12)
        assert torch.allclose(t.grad, t_ref.grad, rtol=1e-10, atol=1e-12)
