"""Hand-checkable values of every loss term: 3 pairs in 2-D, recomputed here with plain float64 math (loops over
Python floats, never the implementation), plus limiting cases whose value is known in closed form."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from alignclip.config import ConfigError, LossConfig
from alignclip.losses import build_objective, dense
from alignclip.losses import objective as objective_module

LOG_SCALE = math.log(2.5)  # s = 2.5
IMAGE_ANGLES = (0.0, 1.1, 2.4)  # unit vectors (cos a, sin a)
TEXT_ANGLES = (0.3, 0.9, -2.0)
# Sentence embeddings, deliberately not unit-norm; pairs (0, 2) and (1, 2) have NEGATIVE cosine similarity.
SEMANTIC = ((1.0, 0.2), (0.5, 1.5), (-2.0, 0.1))


# ------------------------------------------------------------------------ independent float64 arithmetic
def unit(angle):
    return (math.cos(angle), math.sin(angle))


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def sq_dist(a, b):
    return sum((x - y) ** 2 for x, y in zip(a, b))


def cosine(a, b):
    return dot(a, b) / math.sqrt(dot(a, a) * dot(b, b))


def ce_row(row, label):
    """-log softmax(row)[label]."""
    return -row[label] + math.log(sum(math.exp(z) for z in row))


def ce(matrix):
    return sum(ce_row(row, i) for i, row in enumerate(matrix)) / len(matrix)


def ref_clip_directions(v, t, s):
    image_to_text = ce([[s * dot(v[i], t[j]) for j in range(len(t))] for i in range(len(v))])
    text_to_image = ce([[s * dot(t[i], v[j]) for j in range(len(v))] for i in range(len(t))])
    return image_to_text, text_to_image


def ref_imsep(x, v, t, s, semantic=None):
    """Off-diagonal s (x_i . x_j)(1 - S_ij), diagonal s (v_i . t_i); semantic None means D = 1."""
    n = len(x)
    rows = []
    for i in range(n):
        row = []
        for j in range(n):
            if i == j:
                row.append(s * dot(v[i], t[i]))
            else:
                d = 1.0 - cosine(semantic[i], semantic[j]) if semantic is not None else 1.0
                row.append(s * dot(x[i], x[j]) * d)
        rows.append(row)
    return ce(rows)


def ref_log_mean_exp(a, b):
    n = len(a)
    total = sum(math.exp(-2.0 * sq_dist(a[i], b[j])) for i in range(n) for j in range(n) if i != j)
    return math.log(total / (n * (n - 1)))


def ref_alignment(v, t):
    return sum(sq_dist(a, b) for a, b in zip(v, t)) / len(v)


# --------------------------------------------------------------------------------------------- fixtures
def tensors(v, t, semantic=SEMANTIC):
    as_t = lambda rows: torch.tensor(rows, dtype=torch.float64)  # noqa: E731
    return as_t(v), as_t(t), as_t(semantic), torch.tensor(LOG_SCALE, dtype=torch.float64)


def objective(**weights):
    base = dict(impl="dense", clip_weight=0.0)
    base.update(weights)
    return build_objective(LossConfig(**base))


@pytest.fixture
def batch():
    v = [unit(a) for a in IMAGE_ANGLES]
    t = [unit(a) for a in TEXT_ANGLES]
    return v, t


# ------------------------------------------------------------------------------------------- the values
def test_clip_is_the_mean_of_both_directions_and_crsep_their_sum(batch):
    v, t = batch
    i2t, t2i = ref_clip_directions(v, t, 2.5)
    out = objective(clip_weight=1.0, crsep_weight=1.0)(*tensors(v, t)[:2], tensors(v, t)[3])
    assert out.terms["clip"].item() == pytest.approx(0.5 * (i2t + t2i), abs=1e-12)
    assert out.terms["crsep"].item() == pytest.approx(i2t + t2i, abs=1e-12)
    assert i2t != pytest.approx(t2i)  # the batch is not symmetric: the two directions are really both checked


@pytest.mark.parametrize("sides", ["image", "text", "both"])
@pytest.mark.parametrize("rescale", [True, False])
def test_imsep_matches_hand_computation(batch, sides, rescale):
    v, t = batch
    sem = SEMANTIC if rescale else None
    image_side = ref_imsep(v, v, t, 2.5, sem)
    text_side = ref_imsep(t, v, t, 2.5, sem)
    expected = {"image": image_side, "text": text_side, "both": image_side + text_side}[sides]
    ev, et, es, scale = tensors(v, t)
    out = objective(imsep_weight=1.0, imsep_sides=sides, imsep_rescale=rescale)(ev, et, scale, es)
    assert out.terms["imsep"].item() == pytest.approx(expected, abs=1e-12)
    assert out.total.item() == pytest.approx(expected, abs=1e-12)
    if sides == "both":
        assert out.terms["imsep_image"].item() == pytest.approx(image_side, abs=1e-12)
        assert out.terms["imsep_text"].item() == pytest.approx(text_side, abs=1e-12)


def test_alignclip_default_is_crsep_plus_half_image_side_imsep(batch):
    v, t = batch
    i2t, t2i = ref_clip_directions(v, t, 2.5)
    expected = 1.0 * (i2t + t2i) + 0.5 * ref_imsep(v, v, t, 2.5, SEMANTIC)
    ev, et, es, scale = tensors(v, t)
    out = objective(crsep_weight=1.0, imsep_weight=0.5)(ev, et, scale, es)
    assert out.total.item() == pytest.approx(expected, abs=1e-12)
    assert dense.alignclip_loss(ev, et, ev, et, F.normalize(es, dim=1), F.normalize(es, dim=1), scale).item() \
        == pytest.approx(expected, abs=1e-12)


def test_gap_terms_match_hand_computation(batch):
    v, t = batch
    ev, et, _, scale = tensors(v, t)
    out = objective(uniform_weight=1.0, xuniform_weight=1.0, align_weight=1.0)(ev, et, scale)
    uniform = 0.5 * (ref_log_mean_exp(v, v) + ref_log_mean_exp(t, t))
    assert out.terms["uniform"].item() == pytest.approx(uniform, abs=1e-12)
    assert out.terms["xuniform"].item() == pytest.approx(ref_log_mean_exp(v, t), abs=1e-12)
    assert out.terms["align"].item() == pytest.approx(ref_alignment(v, t), abs=1e-12)


def test_cua_and_cuaxu_combinations(batch):
    v, t = batch
    ev, et, _, scale = tensors(v, t)
    i2t, t2i = ref_clip_directions(v, t, 2.5)
    cua = 0.5 * (i2t + t2i) + 0.5 * (ref_log_mean_exp(v, v) + ref_log_mean_exp(t, t)) + ref_alignment(v, t)
    cuaxu = cua + ref_log_mean_exp(v, t)
    assert dense.cua_loss(ev, et, ev, et, scale).item() == pytest.approx(cua, abs=1e-12)
    assert dense.cua_loss(ev, et, ev, et, scale, cross_uniform=True).item() == pytest.approx(cuaxu, abs=1e-12)
    out = objective(clip_weight=1.0, uniform_weight=1.0, align_weight=1.0, xuniform_weight=1.0)(ev, et, scale)
    assert out.total.item() == pytest.approx(cuaxu, abs=1e-12)


# ------------------------------------------------------------------------------------- limiting cases
def test_identical_modalities():
    """E_t = E_v: no alignment loss, cross-uniformity = uniformity, both CE directions equal, and IMSep with
    D = 1 is CLIP's image->text CE (the diagonal s v_i.t_i = s v_i.v_i)."""
    x = [unit(a) for a in IMAGE_ANGLES]
    ev, et, _, scale = tensors(x, x)
    i2t, t2i = dense.cross_modal_cross_entropies(ev, et, ev, et, scale, 0)
    assert i2t.item() == pytest.approx(t2i.item(), abs=1e-12)
    assert dense.alignment_loss(ev, et).item() == 0.0
    assert dense.cross_uniformity_loss(ev, et, 0).item() == pytest.approx(dense.uniformity(ev, ev, 0).item(),
                                                                         abs=1e-12)
    imsep = dense.imsep_loss(ev, ev, (ev * et).sum(1), scale, 0)
    assert imsep.item() == pytest.approx(i2t.item(), abs=1e-12)


def test_orthogonal_sets_have_closed_form_values():
    """Images e1, e2, e3 and texts e4, e5, e6 in R^6: P = 0, so every CE is log 3; every squared distance is 2,
    so U = U_x = log e^-4 = -4 and the alignment loss is 2. IMSep (D = 1) has all logits 0: log 3."""
    eye = torch.eye(6, dtype=torch.float64)
    ev, et = eye[:3], eye[3:]
    scale = torch.tensor(LOG_SCALE, dtype=torch.float64)
    out = objective(clip_weight=1.0, imsep_weight=1.0, imsep_rescale=False, uniform_weight=1.0,
                    xuniform_weight=1.0, align_weight=1.0)(ev, et, scale)
    assert out.terms["clip"].item() == pytest.approx(math.log(3), abs=1e-12)
    assert out.terms["imsep"].item() == pytest.approx(math.log(3), abs=1e-12)
    assert out.terms["uniform"].item() == pytest.approx(-4.0, abs=1e-12)
    assert out.terms["xuniform"].item() == pytest.approx(-4.0, abs=1e-12)
    assert out.terms["align"].item() == pytest.approx(2.0, abs=1e-12)


def test_imsep_without_rescaling_is_a_plain_intra_modal_contrastive_loss(batch):
    """D = 1: CE over [s v_i.t_i on the diagonal, s v_i.v_j elsewhere]; the same as rescaling with orthogonal
    sentence embeddings (S_ij = 0 off the diagonal)."""
    v, t = batch
    ev, et, _, scale = tensors(v, t)
    sv = 2.5 * (ev @ ev.T)
    logits = sv.clone()
    logits.diagonal().copy_(2.5 * (ev * et).sum(1))
    plain = F.cross_entropy(logits, torch.arange(3)).item()
    no_rescale = objective(imsep_weight=1.0, imsep_rescale=False)(ev, et, scale)
    orthogonal_semantics = objective(imsep_weight=1.0)(ev, et, scale, torch.eye(3, dtype=torch.float64))
    assert no_rescale.total.item() == pytest.approx(plain, abs=1e-12)
    assert orthogonal_semantics.total.item() == pytest.approx(plain, abs=1e-12)


def test_negative_semantic_similarity_amplifies_the_repulsion(batch):
    """S_ij < 0 gives D_ij > 1: the negative's logit grows in magnitude (not clipped to [0, 1])."""
    v, t = batch
    ev, et, es, scale = tensors(v, t)
    sem = F.normalize(es, dim=1)
    S = sem @ sem.T
    assert S[0, 2] < 0 and S[1, 2] < 0
    assert cosine(SEMANTIC[0], SEMANTIC[2]) < 0
    rescaled = dense.imsep_loss(ev, ev, (ev * et).sum(1), scale, 0, sem, sem)
    assert rescaled.item() == pytest.approx(ref_imsep(v, v, t, 2.5, SEMANTIC), abs=1e-12)


def test_imsep_diagonal_is_set_not_inherited_from_one_minus_s(batch):
    """Sentence embeddings scaled by 3 make S_ii = 9 |e_i|^2, so 1 - S_ii is far from 0: a diagonal taken from
    V ⊙ D would be wrong, yet the positive logit must still be s v_i.t_i."""
    v, t = batch
    raw = [(3 * a, 3 * b) for a, b in SEMANTIC]
    expected = ce([[2.5 * dot(v[i], t[i]) if i == j else 2.5 * dot(v[i], v[j]) * (1.0 - dot(raw[i], raw[j]))
                    for j in range(3)] for i in range(3)])
    ev, et, _, scale = tensors(v, t)
    raw_t = torch.tensor(raw, dtype=torch.float64)
    assert dense.imsep_loss(ev, ev, (ev * et).sum(1), scale, 0, raw_t, raw_t).item() == pytest.approx(expected,
                                                                                                       abs=1e-12)


def test_gathered_layout_with_an_offset_equals_the_rows_of_the_full_loss():
    """Rows 2..3 of a 4-sample batch with offset 2: the mean of the two halves is the full loss."""
    g = torch.Generator().manual_seed(0)
    ev = F.normalize(torch.randn(4, 3, generator=g, dtype=torch.float64), dim=1)
    et = F.normalize(torch.randn(4, 3, generator=g, dtype=torch.float64), dim=1)
    es = F.normalize(torch.randn(4, 5, generator=g, dtype=torch.float64), dim=1)
    scale = torch.tensor(LOG_SCALE, dtype=torch.float64)
    full = dense.contrastive_terms(ev, et, ev, et, es, es, scale, 0, imsep_sides=("image", "text"))
    halves = [dense.contrastive_terms(ev[o:o + 2], et[o:o + 2], ev, et, es[o:o + 2], es, scale, o,
                                      imsep_sides=("image", "text")) for o in (0, 2)]
    for field in full._fields:
        assert getattr(full, field).item() == pytest.approx(
            0.5 * sum(getattr(h, field).item() for h in halves), abs=1e-12)


# ----------------------------------------------------------------------------------------- the objective
def test_total_is_weighted_sum_of_terms_and_terms_exclude_the_total(batch):
    v, t = batch
    ev, et, es, scale = tensors(v, t)
    ev.requires_grad_(True)
    obj = objective(clip_weight=0.3, crsep_weight=0.7, imsep_weight=0.5, imsep_sides="both", uniform_weight=0.2,
                    xuniform_weight=0.1, align_weight=0.4)
    out = obj(ev, et, scale, es)
    assert "total" not in out.terms and all(not v.requires_grad for v in out.terms.values())
    weighted = (0.3 * out.terms["clip"] + 0.7 * out.terms["crsep"] + 0.5 * out.terms["imsep"]
                + 0.2 * out.terms["uniform"] + 0.1 * out.terms["xuniform"] + 0.4 * out.terms["align"])
    assert out.total.item() == pytest.approx(weighted.item(), abs=1e-12)
    assert out.total.requires_grad


def test_one_logit_scale_receives_the_gradient_of_every_term(batch):
    v, t = batch
    ev, et, es, _ = tensors(v, t)
    scale = torch.tensor(LOG_SCALE, dtype=torch.float64, requires_grad=True)
    objective(crsep_weight=1.0, imsep_weight=0.5)(ev, et, scale, es).total.backward()
    h = 1e-6
    f = lambda ls: objective(crsep_weight=1.0, imsep_weight=0.5)(  # noqa: E731
        ev, et, torch.tensor(ls, dtype=torch.float64), es).total.item()
    numeric = (f(LOG_SCALE + h) - f(LOG_SCALE - h)) / (2 * h)
    assert scale.grad.item() == pytest.approx(numeric, rel=1e-6)


def test_bf16_features_are_computed_in_fp32(batch):
    v, t = batch
    ev, et, es, scale = tensors(v, t)
    out = objective(clip_weight=1.0)(ev.bfloat16(), et.bfloat16(), scale.bfloat16())
    assert out.total.dtype == torch.float32
    assert out.total.item() == pytest.approx(objective(clip_weight=1.0)(ev, et, scale).total.item(), abs=0.05)


def test_missing_semantic_embeddings_fail_clearly(batch):
    v, t = batch
    ev, et, _, scale = tensors(v, t)
    with pytest.raises(ValueError, match="imsep_rescale"):
        objective(crsep_weight=1.0, imsep_weight=0.5)(ev, et, scale)
    objective(crsep_weight=1.0, imsep_weight=0.5, imsep_rescale=False)(ev, et, scale)  # D = 1 needs none


def test_config_errors_name_the_key(monkeypatch):
    with pytest.raises(ConfigError, match="loss.clip_weight"):
        build_objective(LossConfig(clip_weight=0.0))
    with pytest.raises(ConfigError, match="loss.imsep_sides"):
        build_objective(LossConfig(imsep_weight=1.0, imsep_sides="left"))
    monkeypatch.setitem(objective_module.FUSED_MODULES, "chunked", "alignclip.losses._not_installed")
    with pytest.raises(ConfigError, match="loss.impl"):
        build_objective(LossConfig(impl="chunked"))
