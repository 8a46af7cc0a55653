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
    assert out["acc5"] == pytest.approx(1.0)
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
    # image queries: image 0 scores captions [1, .9, 0, 0], image 1 [.1, 0, 1, 1] (a tie with its own caption
    # is not "strictly above", so a hit), image 2 [0, .2, 0, .5]: every image finds one of its captions first
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
    assert record == {"dataset": "generated", "model": "tiny clip", "task": "zeroshot_classification",
                      "metrics": {"acc1": 0.5}, "lam": 1.0}


def test_retrieval_across_similarity_blocks_counts_each_match_once():
    rng = np.random.default_rng(2)
    img = rng.normal(size=(2100, 16)).astype(np.float32)  # more rows than one similarity block
    owner = np.repeat(np.arange(2100), 2)
    out = retrieval_metrics(img, img[owner], text_to_image=owner, ks=(1,))
    assert out["image_retrieval_recall@1"] == 1.0 and out["text_retrieval_recall@1"] == 1.0
    shuffled = retrieval_metrics(img, img[rng.permutation(2100)], ks=(1,))
    assert shuffled["image_retrieval_recall@1"] < 0.01
