"""Evaluation on embeddings with hand-checkable answers: zero-shot, retrieval, linear probe, arithmetic."""

import json

import numpy as np
import pytest

from alignclip.eval.arithmetic import arithmetic_queries, arithmetic_retrieval, simat_score
from alignclip.eval.linear_probe import linear_probe
from alignclip.eval.results import write_result
from alignclip.eval.retrieval import retrieval_metrics
from alignclip.eval.zeroshot import (class_prompts, classification_metrics, ensemble_class_embeddings,
                                     zero_shot_classification)


def test_prompt_ensemble_averages_normalised_templates():
    assert class_prompts(["cat", "dog"], ["a {c}.", "photo of {}"]) == ["a cat.", "photo of cat", "a dog.",
                                                                         "photo of dog"]
    prompts = np.array([[2.0, 0.0], [0.0, 1.0], [0.0, -3.0], [-1.0, 0.0]])  # class-major, 2 templates
    w = ensemble_class_embeddings(prompts, 2)
    np.testing.assert_allclose(w, [[np.sqrt(0.5), np.sqrt(0.5)], [-np.sqrt(0.5), -np.sqrt(0.5)]])


def test_classification_metrics_top1_top5_and_balanced_recall():
    logits = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.8, 0.05, 0.15], [0.1, 0.2, 0.7]])
    labels = [0, 1, 1, 2]  # third sample wrong at top-1, right at top-3
    out = classification_metrics(logits, labels, ks=(1, 2, 5))
    assert out["acc1"] == pytest.approx(0.75)
    assert out["acc2"] == pytest.approx(0.75)
    assert np.isnan(out["acc5"])  # CLIP_benchmark: no top-5 accuracy below 5 classes
    assert out["mean_per_class_recall"] == pytest.approx((1 + 0.5 + 1) / 3)


def test_zero_shot_with_exact_class_directions_is_perfect():
    classes = np.eye(4)
    labels = np.array([0, 1, 2, 3, 2, 1])
    images = classes[labels] + 0.1
    assert zero_shot_classification(images, labels, classes)["acc1"] == 1.0


def test_retrieval_with_several_captions_per_image():
    img = np.eye(3)
    # captions 0,1 describe image 0; caption 2 image 1; caption 3 image 2 but points at image 1
    txt = np.array([[1.0, 0.1, 0], [0.9, 0, 0.2], [0, 1.0, 0], [0, 1.0, 0.5]])
    out = retrieval_metrics(img, txt, text_to_image=[0, 0, 1, 2], ks=(1, 2))
    assert out["image_retrieval_recall@1"] == pytest.approx(3 / 4)  # caption 3 retrieves image 1 first
    assert out["image_retrieval_recall@2"] == pytest.approx(1.0)
    # image queries on normalised rows: image 1 scores its caption 2 (1.0) above caption 3 (0.89); each image
    # finds one of its captions first
    assert out["text_retrieval_recall@1"] == pytest.approx(1.0)
    ident = retrieval_metrics(np.eye(5), np.eye(5))
    assert ident["image_retrieval_recall@1"] == ident["text_retrieval_recall@1"] == 1.0


def test_linear_probe_separates_clusters():
    rng = np.random.default_rng(0)
    centres = 4 * np.eye(6)[:3]
    ytr, yte = rng.integers(0, 3, 150), rng.integers(0, 3, 60)
    out = linear_probe(centres[ytr] + rng.normal(size=(150, 6)) * 0.3, ytr,
                       centres[yte] + rng.normal(size=(60, 6)) * 0.3, yte)
    assert out["acc1"] == 1.0


def test_arithmetic_retrieves_the_target_when_text_deltas_match_image_deltas():
    rng = np.random.default_rng(1)
    attr = {"red": rng.normal(size=16), "blue": rng.normal(size=16)}
    objs = [rng.normal(size=16) for _ in range(5)]
    gallery = np.array([o + attr[a] for o in objs for a in ("red", "blue")])  # image 2k red, 2k+1 blue
    src = np.arange(0, 10, 2)
    out = arithmetic_retrieval(gallery, src, np.tile(attr["red"], (5, 1)), np.tile(attr["blue"], (5, 1)),
                               target_index=src + 1, lam=1.0)
    assert out["arithmetic_recall@1"] == 1.0
    relevance = np.zeros((5, 10))
    relevance[np.arange(5), src + 1] = 1.0
    assert simat_score(gallery, src, np.tile(attr["red"], (5, 1)), np.tile(attr["blue"], (5, 1)), relevance) == 100.0
    # lambda = 0 never leaves the source, which is excluded: the target is then found only by chance
    assert np.allclose(np.linalg.norm(arithmetic_queries(gallery[src], gallery[src], gallery[src]), axis=1), 1.0)


def test_result_json_layout(tmp_path):
    path = write_result(tmp_path, "generated", "tiny clip", "zeroshot_classification", {"acc1": 0.5}, lam=1.0)
    record = json.loads(path.read_text())
    assert record == {"dataset": "generated", "model": "tiny clip", "pretrained": "",
                      "task": "zeroshot_classification", "metrics": {"acc1": 0.5}, "language": "en", "lam": 1.0}


def test_retrieval_across_similarity_blocks_counts_each_match_once():
    rng = np.random.default_rng(2)
    img = rng.normal(size=(2100, 16)).astype(np.float32)  # more rows than one similarity block
    owner = np.repeat(np.arange(2100), 2)
    out = retrieval_metrics(img, img[owner], text_to_image=owner, ks=(1,))
    assert out["image_retrieval_recall@1"] == 1.0 and out["text_retrieval_recall@1"] == 1.0
    shuffled = retrieval_metrics(img, img[rng.permutation(2100)], ks=(1,))
    assert shuffled["image_retrieval_recall@1"] < 0.01


def test_identical_captions_give_chance_retrieval_not_a_tie_advantage():
    rng = np.random.default_rng(4)
    img = rng.normal(size=(8, 5))
    same = np.tile(rng.normal(size=(1, 5)), (8, 1))  # every caption identical
    out = retrieval_metrics(img, same, ks=(1, 3))
    assert out["text_retrieval_recall@1"] == pytest.approx(1 / 8)  # image -> text: chance
    assert out["text_retrieval_recall@3"] == pytest.approx(3 / 8)
    # two own captions tied with two others at the top, k = 1 and 2: 1 - C(2, m) / C(4, m)
    from alignclip.eval.retrieval import tie_aware_hit_rate
    np.testing.assert_allclose(tie_aware_hit_rate(np.array([0, 0, 1]), np.array([2, 2, 2]), np.array([2, 2, 2]), 2),
                               [1 - 1 / 6, 1 - 1 / 6, 0.5])
    np.testing.assert_allclose(tie_aware_hit_rate(np.array([0]), np.array([2]), np.array([2]), 1), [0.5])


def test_clip_benchmark_build_reads_our_json(tmp_path):
    import csv
    import subprocess
    import sys

    from alignclip.eval.results import read_results, write_tables

    write_result(tmp_path / "r", "cifar10", "tiny", "zeroshot_classification", {"acc1": 0.5, "acc5": 0.9})
    write_result(tmp_path / "r", "flickr30k", "tiny", "zeroshot_retrieval", {"image_retrieval_recall@5": 0.25})
    proc = subprocess.run([sys.executable, "-m", "clip_benchmark.cli", "build", str(tmp_path / "r"), "--output",
                           str(tmp_path / "bench.csv")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader((tmp_path / "bench.csv").open()))
    assert sorted(r["dataset"] for r in rows) == ["cifar10", "flickr30k"]
    assert {r["model_fullname"] for r in rows} == {"tiny "}
    csv_path, md_path = write_tables(read_results([tmp_path / "r"]), tmp_path)
    assert "| cifar10 | tiny |  | zeroshot_classification | 0.5000 | 0.9000 |" in md_path.read_text()
