"""The post-hoc baselines (known answers) and the MLP aligner (learns, saves, reloads)."""

import numpy as np
import pytest
import torch

from alignclip.aligner.baselines import CenteredProcrustes, MeanCentering, MeanShift, build_baseline
from alignclip.aligner.mlp import AlignedModel, AlignerShape, MLPAligner, load_aligner, save_aligner
from alignclip.aligner.train import AlignerTraining, train_aligner
from alignclip.analysis import metrics as M


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_mean_shift_closes_a_pure_translation_exactly():
    rng = np.random.default_rng(0)
    img = _unit(rng.normal(size=(300, 16)))
    txt = img + rng.normal(size=16)  # every text = its image plus one fixed vector
    assert M.centroid_distance(img, txt) > 0.3
    shift = MeanShift().fit(img, txt)
    np.testing.assert_allclose(shift.map_image(img), txt, atol=1e-12)
    np.testing.assert_allclose(shift.map_text(txt), txt)
    assert M.centroid_distance(shift.map_image(img), txt) == pytest.approx(0.0, abs=1e-12)
    assert M.alignment_score(shift.map_image(img), txt) == pytest.approx(1.0)


def test_procrustes_recovers_a_rotation():
    rng = np.random.default_rng(1)
    img = _unit(rng.normal(size=(400, 12)))
    rotation, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    txt = img @ rotation
    proc = CenteredProcrustes().fit(img, txt)
    np.testing.assert_allclose(proc.image_map.rotation, rotation, atol=1e-9)
    np.testing.assert_allclose(proc.map_image(img), txt, atol=1e-9)
    assert M.alignment_score(proc.map_image(img), txt) == pytest.approx(1.0)
    # mean shift cannot undo a rotation
    assert M.alignment_score(MeanShift().fit(img, txt).map_image(img), txt) < 0.9


def test_mean_centering_zeroes_both_centroids():
    rng = np.random.default_rng(2)
    img = _unit(rng.normal(size=(200, 8)) + 3.0)
    txt = _unit(rng.normal(size=(200, 8)) - 3.0)
    cen = MeanCentering().fit(img, txt)
    np.testing.assert_allclose(cen.map_image(img).mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(cen.map_text(txt).mean(axis=0), 0.0, atol=1e-12)
    with pytest.raises(ValueError, match="unknown baseline"):
        build_baseline("nope")
    with pytest.raises(RuntimeError, match="fit"):
        MeanShift().map_image(img)


def test_residual_aligner_starts_at_identity_and_roundtrips_through_safetensors(tmp_path):
    aligner = MLPAligner(AlignerShape(dim=8, hidden=16, depth=2, residual=True))
    x = torch.randn(5, 8)
    torch.testing.assert_close(aligner(x), x)
    torch.nn.init.normal_(aligner.out.weight)  # make the output depend on the weights
    path = save_aligner(aligner, tmp_path / "aligner.safetensors", extra={"note": "test"})
    again = load_aligner(path)
    assert again.shape == aligner.shape
    torch.testing.assert_close(again(x), aligner(x))


class _TwoTowers(torch.nn.Module):
    """A stand-in exposing the model interface over linear towers (for the wrapper's plumbing only)."""

    def __init__(self):
        super().__init__()
        self.img, self.txt = torch.nn.Linear(4, 8), torch.nn.Embedding(10, 8)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.0))

    def encode_image(self, images, normalize=False):
        x = self.img(images)
        return torch.nn.functional.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens, normalize=False):
        x = self.txt(tokens).mean(1)
        return torch.nn.functional.normalize(x, dim=-1) if normalize else x

    def forward(self, images, tokens):
        return dict(image_embeds=self.encode_image(images, True), text_embeds=self.encode_text(tokens, True),
                    log_logit_scale=self.logit_scale)


def test_aligned_model_wraps_the_image_encoder():
    base, aligner = _TwoTowers(), MLPAligner(AlignerShape(dim=8, hidden=8, depth=1, residual=False))
    wrapped = AlignedModel(base, aligner)
    images, tokens = torch.randn(3, 4), torch.randint(0, 10, (3, 5))
    expected = torch.nn.functional.normalize(aligner(base.encode_image(images, normalize=True)), dim=-1)
    torch.testing.assert_close(wrapped.encode_image(images, normalize=True), expected)
    torch.testing.assert_close(wrapped.encode_text(tokens), base.encode_text(tokens))
    assert wrapped(images, tokens)["image_embeds"].shape == (3, 8)


@pytest.mark.parametrize("weights", [dict(cosine_weight=1.0),
                                     dict(cosine_weight=1.0, clip_weight=0.5, imsep_weight=0.25)])
def test_mlp_aligner_learns_a_nonlinear_map(weights):
    rng = np.random.default_rng(3)
    img = _unit(rng.normal(size=(600, 8)))
    txt = _unit(np.tanh(2.0 * img @ rng.normal(size=(8, 8))) + 0.5)  # non-linear, off-centre target
    before = M.alignment_score(img, txt)
    settings = AlignerTraining(lr=3e-3, batch_size=64, max_epochs=60, patience=8, **weights)
    aligner, history = train_aligner(img, txt, AlignerShape(dim=8, hidden=64, depth=2), settings)
    after = M.alignment_score(aligner.map_image(img), txt)
    assert after > 0.9 > before
    assert history.val_loss[history.best_epoch] == min(history.val_loss)
    # an orthogonal (linear) fit does worse than the MLP on this non-linear target
    proc = CenteredProcrustes().fit(img, txt)
    assert after > M.alignment_score(proc.map_image(img), txt)


def test_compare_reports_gap_and_tasks_for_every_method(tmp_path):
    from alignclip.aligner.baselines import PostHocAligner
    from alignclip.aligner.compare import compare_methods, write_comparison
    from alignclip.embeddings import ArithmeticTask, EmbeddingSet, ZeroShotTask

    rng = np.random.default_rng(5)
    classes = _unit(rng.normal(size=(4, 16)))
    labels = rng.integers(0, 4, 200)
    txt = _unit(classes[labels] + 0.3 * rng.normal(size=(200, 16)))
    img = txt + 0.8  # a pure modality gap (translation) on top of the text structure
    fit = EmbeddingSet.from_arrays(img[:100], txt[:100], zeroshot={"c": ZeroShotTask(list("abcd"), classes,
                                                                                      labels[:100])})
    held = EmbeddingSet.from_arrays(img[100:], txt[100:], zeroshot={"c": ZeroShotTask(list("abcd"), classes,
                                                                                       labels[100:])},
                                    arithmetic=ArithmeticTask(np.arange(5), np.arange(5, 10), txt[100:105],
                                                              txt[105:110]))
    methods = {"identity": PostHocAligner().fit(*fit.pairs()), "mean_shift": MeanShift().fit(*fit.pairs())}
    rows = compare_methods(methods, held, train_set=fit)  # linear probes: fit on `fit`, scored on `held`
    assert "linear_probe_c" not in compare_methods(methods, held)["identity"]["tasks"]
    assert rows["identity"]["gap"]["centroid_distance"] > 0.5
    assert rows["mean_shift"]["gap"]["centroid_distance"] < 0.05
    assert rows["mean_shift"]["tasks"]["arithmetic"]["arithmetic_recall@1"] == 1.0
    assert {"retrieval", "zeroshot_c", "linear_probe_c", "arithmetic"} <= set(rows["identity"]["tasks"])
    report = write_comparison(rows, tmp_path, "test").read_text()
    assert "| mean_shift |" in report and "zs c top1" in report
