"""The embedding cache round-trips through .npy files and accepts arrays from elsewhere."""

import numpy as np
import pytest

from alignclip.embeddings import ArithmeticTask, EmbeddingSet, ZeroShotTask, merge_repeated_images, task_arrays


def test_cache_roundtrip_with_tasks(tmp_path):
    rng = np.random.default_rng(0)

    def unit(x):  # a cache holds L2-normalised rows, and loading checks it
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    es = EmbeddingSet.from_arrays(unit(rng.normal(size=(6, 4))), unit(rng.normal(size=(6, 4))), keys=list("abcdef"),
                                  captions=[f"c{i}" for i in range(6)],
                                  zeroshot={"shape": ZeroShotTask(["x", "y"], rng.normal(size=(2, 4)),
                                                                  np.array([0, 1, -1, 0, 1, 1]))},
                                  arithmetic=ArithmeticTask(np.array([0]), np.array([1]), rng.normal(size=(1, 4)),
                                                            rng.normal(size=(1, 4))), meta={"model": "m"})
    again = EmbeddingSet.load(es.save(tmp_path / "cache"))
    np.testing.assert_array_equal(again.image, es.image)
    np.testing.assert_array_equal(again.zeroshot["shape"].labels, es.zeroshot["shape"].labels)
    np.testing.assert_array_equal(again.arithmetic.text_b, es.arithmetic.text_b)
    assert again.keys == es.keys and again.meta["model"] == "m"


def test_plain_npy_from_elsewhere(tmp_path):
    np.save(tmp_path / "image.npy", np.eye(3))
    np.save(tmp_path / "text.npy", np.eye(3) * 2)
    es = EmbeddingSet.load(tmp_path / "image.npy")
    assert es.pairs()[1].shape == (3, 3) and list(es.text_to_image) == [0, 1, 2]
    with pytest.raises(ValueError, match="text_to_image"):
        EmbeddingSet.from_arrays(np.eye(3), np.eye(4))


def test_repeated_keys_become_one_image_with_several_captions():
    es = EmbeddingSet.from_arrays(np.array([[1.0, 0], [1.0, 0], [0, 1.0]]), np.eye(3)[:, :2] + 0.1,
                                  keys=["a", "a", "b"], captions=["a1", "a2", "b1"])
    merged = merge_repeated_images(es)
    assert merged.keys == ["a", "b"] and list(merged.text_to_image) == [0, 0, 1]
    assert merged.image.shape == (2, 2) and merged.text.shape == (3, 2)


def test_task_arrays_follow_the_generated_tasks_layout():
    tasks = {"zero_shot": {"colour": {"classnames": ["red", "blue"], "templates": ["a {} thing"], "label": "colour",
                                      "keys": ["k0", "k1"]}},
             "val_labels": {"k0": {"colour": 1}, "k1": {"colour": 0}, "k2": {"colour": 0}},
             "arithmetic": [{"source": "k0", "target": "k1", "from": "blue", "to": "red"}]}
    seen = []

    def encode(texts):
        seen.append(list(texts))
        return np.random.default_rng(len(seen)).normal(size=(len(texts), 4))

    zs, ar = task_arrays(tasks, ["k0", "k1", "k2"], ["a blue thing", "a red thing", "x"], encode)
    assert seen[0] == ["a red thing", "a blue thing"]
    assert list(zs["colour"].labels) == [1, 0, -1]  # k2 is not in the task's keys
    assert seen[1] == ["a blue thing"] and seen[2] == ["a red thing"]
    assert list(ar.source) == [0] and list(ar.target) == [1]
    _, ar_words = task_arrays(tasks, ["k0", "k1", "k2"], ["", "", ""], encode, arithmetic_text="word")
    assert seen[-2:] == [["blue"], ["red"]]


def test_zero_shot_task_from_plain_files(tmp_path):
    from alignclip.embeddings import tasks_from_files

    (tmp_path / "classes.txt").write_text("red\nblue\n")
    (tmp_path / "templates.txt").write_text("a {c} thing\na photo of a {c} thing\n")
    (tmp_path / "labels.tsv").write_text("k0\tblue\nk1\tred\n")
    tasks = tasks_from_files(tmp_path / "classes.txt", tmp_path / "templates.txt", tmp_path / "labels.tsv")
    zs, _ = task_arrays(tasks, ["k0", "k1", "k2"], ["", "", ""], lambda t: np.ones((len(t), 3)))
    assert zs["classes"].classnames == ["red", "blue"]
    assert list(zs["classes"].labels) == [1, 0, -1]
    (tmp_path / "bad.tsv").write_text("k0\tgreen\n")
    with pytest.raises(ValueError, match="green"):
        tasks_from_files(tmp_path / "classes.txt", tmp_path / "templates.txt", tmp_path / "bad.tsv")


def _train_records(root) -> dict[str, dict]:
    import json
    import tarfile

    records = {}
    for path in sorted(root.glob("train-*.tar")):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    records[m.name.split(".", 1)[0]] = json.loads(tar.extractfile(m).read())
    return records


def test_generated_train_split_carries_the_probe_labels(tmp_path):
    """The generated train split, encoded with a real (untrained) model, labels exactly its single-object images,
    each once (v2 writes every image twice, once per caption), and evaluate_set fits the linear probes on it."""
    from alignclip.data.generated import dataset_dir
    from alignclip.config import load_config
    from alignclip.embeddings import encode_with_model
    from alignclip.eval.linear_probe import linear_probe
    from alignclip.eval.suite import evaluate_set
    from tests.helpers.tiny import export_untrained, tiny_overrides

    overrides = tiny_overrides(tmp_path / "data", **{"data.generated.version": 2})
    model = export_untrained(tmp_path / "model.safetensors", overrides)
    train = encode_with_model(model, split="train")
    val = encode_with_model(model, split="val")
    records = _train_records(dataset_dir(load_config(None, overrides).data))
    assert len(train.image) == len(records) == 64 and train.arithmetic is None
    first = {}
    for key in sorted(records):
        first.setdefault(records[key]["image_id"], key)
    expected = {k: records[k]["labels"] for k in first.values() if records[k]["labels"]["num_objects"] == 1}
    assert 0 < len(expected) < 32
    for name in ("colour", "shape"):
        labels = train.zeroshot[name].labels
        assert {train.keys[i]: int(labels[i]) for i in np.flatnonzero(labels >= 0)} == \
            {k: lab[name] for k, lab in expected.items()}
    results = evaluate_set(val, train=train)
    assert not any(task.startswith("linear_probe_") for task in evaluate_set(val))  # no train set: no probe
    for name in ("colour", "shape"):
        fit, rows = np.flatnonzero(train.zeroshot[name].labels >= 0), np.flatnonzero(val.zeroshot[name].labels >= 0)
        by_hand = linear_probe(train.image[fit], train.zeroshot[name].labels[fit], val.image[rows],
                               val.zeroshot[name].labels[rows])
        assert results[f"linear_probe_{name}"] == by_hand
        assert 0.0 <= by_hand["acc1"] <= 1.0
