"""Known-answer tests of the gap metrics (alignclip.analysis.metrics)."""

import math

import numpy as np
import pytest
import torch

from alignclip.analysis import metrics as M


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _random_unit(n, d, seed):
    return _unit(np.random.default_rng(seed).normal(size=(n, d)))


def test_identical_modalities_have_no_gap():
    x = _random_unit(200, 16, 0)
    assert M.alignment_score(x, x) == pytest.approx(1.0)
    assert M.centroid_distance(x, x) == pytest.approx(0.0, abs=1e-12)
    assert M.alignment_loss(x, x) == pytest.approx(0.0, abs=1e-12)
    assert M.relative_modality_gap(x, x, "l2") == pytest.approx(0.0, abs=1e-12)
    assert M.relative_modality_gap(x, x, "cosine") == pytest.approx(0.0, abs=1e-12)
    # identical points cannot be told apart: a chance-level classifier
    assert 0.35 <= M.linear_separability(x, x, seed=0) <= 0.65


def test_far_apart_clusters_are_perfectly_separable():
    rng = np.random.default_rng(1)
    img = _unit(np.array([5.0] + [0.0] * 7) + 0.1 * rng.normal(size=(100, 8)))
    txt = _unit(np.array([-5.0] + [0.0] * 7) + 0.1 * rng.normal(size=(100, 8)))
    assert M.linear_separability(img, txt, seed=0) == 1.0
    assert M.centroid_distance(img, txt) == pytest.approx(2.0, abs=0.01)  # antipodal centroids
    assert M.alignment_score(img, txt) == pytest.approx(-1.0, abs=0.01)


def test_centroid_distance_is_not_squared_and_normalises_rows():
    img = np.array([[3.0, 0.0], [5.0, 0.0]])  # both normalise to (1, 0)
    txt = np.array([[0.0, 2.0], [0.0, 7.0]])  # both normalise to (0, 1)
    assert M.centroid_distance(img, txt) == pytest.approx(math.sqrt(2.0))
    assert M.alignment_score(img, txt) == pytest.approx(0.0)


def test_rmg_both_forms_by_hand():
    # two pairs on a circle: x = (1,0),(0,1); y = (0,1),(-1,0) -> every paired cos = 0
    img = np.array([[1.0, 0.0], [0.0, 1.0]])
    txt = np.array([[0.0, 1.0], [-1.0, 0.0]])
    # l2: paired distance sqrt(2); intra: |x1-x2| = sqrt2, |y1-y2| = sqrt2 -> (2*sqrt2 + 2*sqrt2)/(2*2*1) = sqrt2
    assert M.relative_modality_gap(img, txt, "l2") == pytest.approx(0.5)
    # cosine: paired (1-0)/2 = 0.5; intra (1-0)/2 = 0.5 -> 0.5 / (0.5 + 0.5)
    assert M.relative_modality_gap(img, txt, "cosine") == pytest.approx(0.5)
    # make pairs closer than the intra-modal spread: RMG < 0.5 in both forms, and the forms differ
    txt2 = _unit(img + np.array([[0.0, 0.3], [-0.3, 0.0]]))
    l2, cos = M.relative_modality_gap(img, txt2, "l2"), M.relative_modality_gap(img, txt2, "cosine")
    assert 0 < cos < l2 < 0.5
    with pytest.raises(ValueError, match="distance"):
        M.relative_modality_gap(img, txt, "manhattan")


def test_uniformity_and_cross_modal_uniformity_by_hand():
    x = np.array([[1.0, 0.0], [-1.0, 0.0]])  # squared distance 4 between the two
    assert M.uniformity(x) == pytest.approx(-8.0)  # log exp(-2 * 4)
    y = np.array([[0.0, 1.0], [0.0, -1.0]])  # x_i vs y_j (i != j): squared distance 2
    assert M.cross_modal_uniformity(x, y) == pytest.approx(-4.0)
    assert M.alignment_loss(x, y) == pytest.approx(2.0)


def test_torch_and_numpy_inputs_agree_and_give_floats():
    x = _random_unit(64, 8, 2)
    y = _random_unit(64, 8, 3)
    tx = torch.tensor(x, dtype=torch.float32, requires_grad=True)
    ty = torch.tensor(y, dtype=torch.float32)
    for fn in (M.alignment_score, M.centroid_distance, M.alignment_loss, M.cross_modal_uniformity):
        out = fn(tx, ty)
        assert isinstance(out, float)
        assert out == pytest.approx(fn(x, y), abs=1e-5)
    assert M.paired_cosines(tx, ty).shape == (64,)


def test_explained_variance_of_a_planar_cloud():
    rng = np.random.default_rng(4)
    flat = np.zeros((300, 10))
    flat[:, :2] = rng.normal(size=(300, 2))  # lives on a great circle: rank 2 before centring
    ratio = M.explained_variance_ratio(flat)
    assert ratio.sum() == pytest.approx(1.0)
    assert ratio[:2].sum() == pytest.approx(1.0)
    assert M.components_for_variance(flat, 0.99) <= 2


def test_gap_metrics_dict_is_complete():
    x, y = _random_unit(50, 8, 5), _random_unit(50, 8, 6)
    out = M.gap_metrics(x, y)
    assert set(out) >= {"alignment_score", "centroid_distance", "rmg_l2", "rmg_cosine", "linear_separability",
                        "uniformity", "cross_modal_uniformity", "alignment_loss"}
    assert all(isinstance(v, int if k.startswith("pca_") else float) for k, v in out.items())


# ------------------------------------------------------------------ input validation of the tools (one line, exit 2)
def _cache(path, n=20, d=8, seed=0, source="shards/val-{0..3}.tar", **broken):
    from alignclip.embeddings import EmbeddingSet

    img, txt = _random_unit(n, d, seed), _random_unit(n, d, seed + 1)
    es = EmbeddingSet.from_arrays(img, txt, meta={"source": source})
    es.save(path)
    for name, arr in broken.items():
        np.save(path / f"{name}.npy", arr)
    return path


def _run_tool(name, argv):
    import subprocess
    import sys
    from pathlib import Path

    return subprocess.run([sys.executable, "-m", f"alignclip.commands.{name}", *argv], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parent.parent, timeout=600)


def test_broken_caches_are_refused_naming_the_problem(tmp_path):
    from alignclip.embeddings import CacheError, EmbeddingSet

    EmbeddingSet.load(_cache(tmp_path / "ok"))  # a good cache loads
    bad_owner = np.arange(20)
    bad_owner[3] = 25
    cases = {"owner": ({"text_to_image": bad_owner}, "text_to_image\\[3\\] = 25 is outside \\[0, 20\\)"),
             "negative": ({"text_to_image": -np.ones(20, dtype=np.int64)}, "is outside"),
             "nan": ({"image": np.full((20, 8), np.nan)}, "NaN or inf"),
             "zeros": ({"text": np.zeros((20, 8))}, "all zeros"),
             "unnormalised": ({"image": 3 * _random_unit(20, 8, 5)}, "norm 3.0000"),
             "width": ({"text": _random_unit(20, 4, 5)}, "width")}
    for name, (broken, message) in cases.items():
        with pytest.raises(CacheError, match=message):
            EmbeddingSet.load(_cache(tmp_path / name, **broken))
    # the tools: one line on stderr, exit 2, no traceback
    proc = _run_tool("gap_analysis", ["--model", f"a={tmp_path / 'owner'}", "--out", str(tmp_path / "g")])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "text_to_image[3] = 25" in proc.stderr
    proc = _run_tool("evaluate", ["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "e")])
    assert proc.returncode == 2 and "expected an embedding cache directory" in proc.stderr
    proc = _run_tool("evaluate", ["--model", "x.safetensors", "--out", str(tmp_path / "e"), "--benchmark", "cifar10",
                                  "--root", str(tmp_path / "nothing")])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "x.safetensors" in proc.stderr


def test_gap_analysis_refuses_models_measured_on_different_data(tmp_path):
    import json

    a = _cache(tmp_path / "a", source="shards/val-{0..3}.tar")
    b = _cache(tmp_path / "b", seed=3, source="other/val.tar")
    proc = _run_tool("gap_analysis", ["--model", f"a={a}", "--model", f"b={b}", "--out", str(tmp_path / "g")])
    assert proc.returncode == 2 and "different data" in proc.stderr and "--allow-mixed-data" in proc.stderr
    proc = _run_tool("gap_analysis", ["--model", f"a={a}", "--model", f"b={b}", "--out", str(tmp_path / "g"),
                                      "--allow-mixed-data"])
    assert proc.returncode == 0, proc.stderr
    figures = json.loads((tmp_path / "g" / "gap_metrics.json").read_text())
    assert figures["a"]["data_source"] == "shards/val-{0..3}.tar" and figures["b"]["data_source"] == "other/val.tar"
    assert figures["a"]["num_pairs"] == figures["b"]["num_pairs"] == 20
    same = _cache(tmp_path / "c", seed=5, source="shards/val-{0..3}.tar")
    assert _run_tool("gap_analysis", ["--model", f"a={a}", "--model", f"c={same}", "--out",
                                      str(tmp_path / "g2")]).returncode == 0


def test_a_run_directory_is_refused_without_trust_checkpoint(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for tool, argv in (("gap_analysis", ["--model", f"a={run}", "--out", str(tmp_path / "g")]),
                       ("evaluate", ["--model", str(run), "--out", str(tmp_path / "e")]),
                       ("distill_aligner", ["--fit", str(run), "--out", str(tmp_path / "d")])):
        proc = _run_tool(tool, argv)
        assert proc.returncode == 2, (tool, proc.stderr)
        assert "unpickles" in proc.stderr and "--trust-checkpoint" in proc.stderr and "Traceback" not in proc.stderr
        assert "UNPICKLES" in _run_tool(tool, ["--help"]).stdout.replace("\n", " ")
    # with the flag it goes on (and fails later only because this run has no checkpoint)
    proc = _run_tool("evaluate", ["--model", str(run), "--out", str(tmp_path / "e"), "--trust-checkpoint"])
    assert proc.returncode == 2 and "no complete checkpoint" in proc.stderr


def test_models_size_command_has_help():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "alignclip.models", "--help"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "usage" in proc.stdout.lower()
