"""The generated dataset: reproducible, its captions say what its pixels show, and its ground truth holds."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile

import numpy as np
import pytest
from PIL import Image

from alignclip.config import load_config
from alignclip.data import build_train_loader
from alignclip.data import generated as G

_CAPTION = re.compile(r"^a (small|large) (\w+) (\w+)(?: (left of|right of|above|below) a (small|large) (\w+) (\w+))?$")


def _mask(pixels: np.ndarray, colour: str) -> np.ndarray:
    """Pixels within the jitter (+ JPEG / anti-aliasing slack) of a palette colour, and nearer to it than to any
    other palette colour."""
    palette = np.asarray(list(G.COLOURS.values()), np.float32)
    dist = np.linalg.norm(pixels[..., None, :].astype(np.float32) - palette, axis=-1)
    index = list(G.COLOURS).index(colour)
    return (dist.argmin(-1) == index) & (dist[..., index] < 45)


def test_captions_match_the_pixels_drawn():
    """Parse each caption (not the scene record) and find it in the image: the named colours are there and no other,
    bigger is bigger, the relation holds between the colour blobs' centroids, circles and squares fill as such."""
    checked = 0
    for index in range(60):
        scene = G.sample_scene(G.scene_rng(7, "train", index), 64)
        pixels = np.asarray(G.render(scene))
        size_a, colour_a, shape_a, relation, size_b, colour_b, shape_b = _CAPTION.match(scene.caption()).groups()
        named = [(size_a, colour_a, shape_a)] + ([(size_b, colour_b, shape_b)] if relation else [])
        masks = {colour: _mask(pixels, colour) for _, colour, _ in named}
        for _, colour, _ in named:
            assert masks[colour].sum() > 40, (scene.caption(), colour)
        for other in set(G.COLOURS) - set(masks):
            assert _mask(pixels, other).sum() < 8, (scene.caption(), other)
        for size, colour, shape in named:
            ys, xs = np.nonzero(masks[colour])
            corners = sum(bool(masks[colour][y, x]) for y in (ys.min(), ys.max()) for x in (xs.min(), xs.max()))
            if shape == "square":  # the blob fills its bounding box's corners; a circle reaches none of them
                assert corners >= 3, scene.caption()
            if shape == "circle":
                assert corners == 0, scene.caption()
        if relation:
            (ya, xa), (yb, xb) = [np.argwhere(masks[c]).mean(0) for c in (colour_a, colour_b)]
            holds = {"left of": xa < xb, "right of": xa > xb, "above": ya < yb, "below": ya > yb}[relation]
            assert holds, scene.caption()
            if size_a != size_b:
                big, small = (colour_a, colour_b) if size_a == "large" else (colour_b, colour_a)
                assert masks[big].sum() > masks[small].sum(), scene.caption()
        checked += 1
    assert checked == 60


@pytest.fixture(scope="module")
def small_generated(tmp_path_factory):
    cache = tmp_path_factory.mktemp("gen")
    overrides = [f"data.cache_dir={cache}", "data.generated.num_shards=2", "data.generated.samples_per_shard=16",
                 "data.generated.val_samples=12", "data.generated.image_size=32", "data.train=generated"]
    config = load_config(None, overrides)
    return config, G.ensure_generated(config.data)


def _tar_digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_generator_is_deterministic_and_rendered_once(small_generated, tmp_path):
    config, dataset = small_generated
    again = G.write_split(tmp_path, "train", 2, 16, 32, config.data.generated.seed)
    for i in range(2):
        assert _tar_digest(dataset.root / f"train-{i:05d}.tar") == _tar_digest(tmp_path / f"train-{i:05d}.tar")
    assert len(again["labels"]) == 32
    before = (dataset.root / "train-00000.tar").stat().st_mtime_ns
    assert G.ensure_generated(config.data).root == dataset.root
    assert (dataset.root / "train-00000.tar").stat().st_mtime_ns == before  # complete: not rendered again
    other_seed = G.write_split(tmp_path / "s1", "train", 1, 16, 32, config.data.generated.seed + 1)
    assert _tar_digest(tmp_path / "s1" / "train-00000.tar") != _tar_digest(tmp_path / "train-00000.tar")
    assert len(other_seed["labels"]) == 16


def _val_samples(dataset) -> dict[str, dict]:
    out = {}
    with tarfile.open(dataset.root / "val-00000.tar") as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def test_zero_shot_and_arithmetic_ground_truth(small_generated):
    _, dataset = small_generated
    tasks = dataset.tasks()
    samples = _val_samples(dataset)
    assert len(samples) == 12 and len(tasks["arithmetic"]) == 6
    colour_task = tasks["zero_shot"]["colour"]
    assert colour_task["classnames"] == list(G.COLOURS) and all("{}" in t for t in colour_task["templates"])
    assert colour_task["keys"] and colour_task["keys"] == tasks["zero_shot"]["shape"]["keys"]
    for key in colour_task["keys"]:  # single-object samples: the label is the caption's colour and shape
        caption = samples[key]["txt"].decode()
        labels = tasks["val_labels"][key]
        assert labels["num_objects"] == 1
        assert caption.split()[3] == G.SHAPES[labels["shape"]]
        assert caption.split()[2] == list(G.COLOURS)[labels["colour"]]
    for item in tasks["arithmetic"]:
        source, target = samples[item["source"]], samples[item["target"]]
        words = source["txt"].decode().split(" ")
        position = 2 if item["attribute"] == "colour" else 3  # "a small red circle ..."
        assert words[position] == item["from"]
        words[position] = item["to"]
        assert target["txt"].decode() == " ".join(words)
        a = np.asarray(Image.open(io.BytesIO(source["jpg"])), np.float32)
        b = np.asarray(Image.open(io.BytesIO(target["jpg"])), np.float32)
        changed = np.abs(a - b).max(-1) > 40
        assert 0 < changed.mean() < 0.3  # only the first object changed; background and the other object did not
        scene = json.loads(source["json"])["scene"]
        obj = scene["objects"][0]
        ys, xs = np.nonzero(changed)
        assert abs(xs.mean() / 32 - obj["cx"]) < 0.1 and abs(ys.mean() / 32 - obj["cy"]) < 0.1


def test_generated_shards_go_through_the_training_pipeline(small_generated):
    config, _ = small_generated
    config.train.global_batch_size = 8
    config.model.vision.image_size = 32
    loader = build_train_loader(config, 0, 1, 0)
    keys = [k for batch in loader for k in batch["key"]]
    assert len(loader) == 4 and sorted(keys) == [f"{i:09d}" for i in range(32)]

