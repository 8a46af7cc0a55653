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

from alignclip.config import ConfigError, load_config
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



# ------------------------------------------------------------------------------------------- generator v2
_PHRASE = re.compile(r"^an? (?:(small|large) )?(?:(\w+) (circle|square|triangle|diamond|cross|shape)|"
                     r"(circle|square|triangle|diamond|cross))$")


def _parse_v2(caption: str) -> tuple[list[tuple[str | None, str | None, str | None]], str | None]:
    """"a small red circle with a square and a blue shape on a dotted background" ->
    ([(size, colour, shape)], pattern); None where the caption leaves a fact out."""
    caption, _, pattern = caption.partition(" on a ")
    head, _, rest = caption.partition(" with ")
    phrases = [head] + (rest.split(" and ") if rest else [])
    named = []
    for phrase in phrases:
        m = _PHRASE.match(phrase)
        assert m, phrase
        size, colour, shape, bare = m.groups()
        named.append((size, colour, None if shape == "shape" else (shape or bare)))
    return named, pattern.removesuffix(" background") if pattern else None


def test_v2_captions_name_part_of_what_is_drawn():
    """Every fact a v2 caption states is in the scene drawn (colours found in the pixels); at coverage 1/2 some
    objects and backgrounds go unnamed; at coverage 1 every object and the background are named."""
    unnamed_objects = unnamed_backgrounds = 0
    for coverage in (0.5, 1.0):
        recipe = G.Recipe(2, coverage, 2, 3)
        for index in range(40):
            scene, caption, image = G._train_sample(3, index, 80, 64, recipe)
            named, pattern = _parse_v2(caption)
            pixels = np.asarray(G.render(scene))
            drawn = {o.colour: o for o in scene.objects}
            for size, colour, shape in named:
                assert colour or shape, caption
                candidates = [o for o in scene.objects if (colour in (None, o.colour)) and (shape in (None, o.shape))
                              and (size in (None, o.size))]
                assert candidates, caption
                if colour:
                    assert colour in drawn and _mask(pixels, colour).sum() > 10, caption
            assert pattern in (None, scene.pattern) and scene.pattern in G.PATTERNS
            if coverage == 1.0:
                assert len(named) == len(scene.objects) and pattern == scene.pattern
                assert all(size and colour and shape for size, colour, shape in named), caption
            else:
                unnamed_objects += len(scene.objects) - len(named)
                unnamed_backgrounds += pattern is None
    assert unnamed_objects > 5 and unnamed_backgrounds > 5


def test_v2_coverage_zero_names_one_attribute_of_the_subject():
    recipe = G.Recipe(2, 0.0, 2, 3)
    for index in range(20):
        _, caption, _ = G._train_sample(0, index, 40, 32, recipe)
        named, pattern = _parse_v2(caption)
        assert len(named) == 1 and pattern is None and named[0][0] is None
        assert (named[0][1] is None) != (named[0][2] is None), caption  # colour or shape, not both


def test_v2_several_captions_per_image(tmp_path):
    """captions_per_image=2: sample i and i + n/2 hold the same image (same bytes), with different captions."""
    recipe = G.Recipe(2, 0.5, 2, 3)
    G.write_split(tmp_path, "train", 2, 16, 32, 0, recipe=recipe)
    samples = {}
    for shard in range(2):
        with tarfile.open(tmp_path / f"train-{shard:05d}.tar") as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    keys = sorted(samples)
    assert len(keys) == 32
    differing = 0
    for i in range(16):
        a, b = samples[keys[i]], samples[keys[i + 16]]
        assert a["jpg"] == b["jpg"]
        assert json.loads(a["json"])["image_id"] == json.loads(b["json"])["image_id"] == i
        differing += a["txt"] != b["txt"]
    assert differing >= 10
    assert len({samples[k]["jpg"] for k in keys[:16]}) == 16


def test_v2_dataset_ground_truth_and_versions(tmp_path):
    base = [f"data.cache_dir={tmp_path}", "data.generated.num_shards=1", "data.generated.samples_per_shard=8",
            "data.generated.val_samples=24", "data.generated.image_size=32", "data.train=generated"]
    v2 = G.ensure_generated(load_config(None, base + ["data.generated.version=2"]).data)
    v1 = G.ensure_generated(load_config(None, base).data)
    assert v2.root != v1.root and v2.root.name.startswith("v2-") and "cov0.5-cap2-obj2" in v2.root.name
    assert v1.root.name.startswith("v1-")
    tasks = v2.tasks()
    assert tasks["generator_version"] == 2 and tasks["classes"]["pattern"] == list(G.PATTERNS)
    assert "a {} circle" in tasks["zero_shot"]["colour"]["templates"]  # v2 captions may omit the size
    samples = _val_samples(v2)
    for key in tasks["zero_shot"]["colour"]["keys"]:
        named, _ = _parse_v2(samples[key]["txt"].decode())
        labels = tasks["val_labels"][key]
        assert labels["num_objects"] == 1 and named[0][1] == list(G.COLOURS)[labels["colour"]]
        assert named[0][2] == G.SHAPES[labels["shape"]]
    for item in tasks["arithmetic"]:  # the target caption is the source's with the one word swapped
        source, target = samples[item["source"]]["txt"].decode(), samples[item["target"]]["txt"].decode()
        a, b = source.split(" with ")[0].split(" on a ")[0], target.split(" with ")[0].split(" on a ")[0]
        assert a.split()[-1 if item["attribute"] == "shape" else -2] == item["from"]
        assert b.split()[-1 if item["attribute"] == "shape" else -2] == item["to"]
        assert source[len(a):] == target[len(b):]
    for key, value, message in (("version", 4, ">= 1 and <= 3"), ("caption_coverage", 1.5, ">= 0 and <= 1"),
                                ("colour_coverage", -0.5, ">= 0 and <= 1"),
                                ("captions_per_image", 0, ">= 1"), ("max_objects", 9, ">= 1 and <= 3")):
        with pytest.raises(ConfigError, match=re.escape(message)) as err:
            G.ensure_generated(load_config(None, base + [f"data.generated.{key}={value}"]).data)
        assert f"data.generated.{key}" in str(err.value)


def test_v3_captions_name_every_object_by_its_shape_and_its_colour_sometimes():
    """v3: v2's scenes and draws, but each named object is named by its shape always and by its colour with
    probability colour_coverage; the other facts as v2 at caption_coverage; validation captions name the subject's
    colour and shape (the zero-shot and arithmetic ground truth)."""
    recipe = G.Recipe(3, 0.5, 2, 2, colour_coverage=0.25)
    v2 = G.Recipe(2, 0.5, 2, 2)
    phrases = coloured = 0
    for index in range(400):
        scene, caption, _ = G._train_sample(5, index, 800, 32, recipe)
        named, pattern = _parse_v2(caption)
        assert all(shape is not None for _, _, shape in named), caption  # never "a red shape"
        for size, colour, shape in named:
            assert any(o.shape == shape and colour in (None, o.colour) and size in (None, o.size)
                       for o in scene.objects), caption
        phrases, coloured = phrases + len(named), coloured + sum(colour is not None for _, colour, _ in named)
        assert pattern in (None, scene.pattern)
        scene2, caption2, _ = G._train_sample(5, index, 800, 32, v2)
        assert scene2 == scene and len(_parse_v2(caption2)[0]) == len(named)  # same scenes, same facts named
    assert abs(coloured / phrases - 0.25) < 0.05, coloured / phrases
    for index in range(0, 40, 2):
        scene, caption, _ = G._val_scene(5, index, 32, recipe)
        subject = _parse_v2(caption)[0][0]
        assert subject[1:] == (scene.objects[0].colour, scene.objects[0].shape), caption
    shape_templates = G.zero_shot_tasks(3)["shape"]["templates"]
    assert "a {}" in shape_templates and "a red {}" in shape_templates and "a {}" not in G.zero_shot_tasks(2)[
        "shape"]["templates"]


def test_v3_is_a_version_of_its_own_and_v2_records_are_unchanged(tmp_path):
    base = [f"data.cache_dir={tmp_path}", "data.generated.num_shards=1", "data.generated.samples_per_shard=8",
            "data.generated.val_samples=8", "data.generated.image_size=32", "data.train=generated"]
    v3 = G.ensure_generated(load_config(None, base + ["data.generated.version=3"]).data)
    v2 = G.ensure_generated(load_config(None, base + ["data.generated.version=2"]).data)
    assert v3.root.name.endswith("-col0.25") and not v2.root.name.endswith("-col0.25")
    assert v3.tasks()["config"]["colour_coverage"] == 0.25 and "colour_coverage" not in v2.tasks()["config"]
    assert (v3.root / "train-00000.tar").read_bytes() != (v2.root / "train-00000.tar").read_bytes()


def _shard_records(paths) -> dict[str, dict]:
    records = {}
    for path in paths:
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    records[m.name.split(".", 1)[0]] = json.loads(tar.extractfile(m).read())
    return records


@pytest.mark.parametrize("version", [1, 2, 3])
def test_train_split_tasks_are_the_labels_in_the_rendered_shards(tmp_path, version):
    """split_tasks(train) samples scenes without rendering; its labels are those written in the real shards, its
    probe keys each single-object image once (v2: at its first caption), and split_tasks(val) is tasks.json's."""
    config = load_config(None, [f"data.cache_dir={tmp_path}", "data.generated.num_shards=2",
                                "data.generated.samples_per_shard=12", "data.generated.val_samples=10",
                                "data.generated.image_size=32", "data.train=generated",
                                f"data.generated.version={version}"])
    dataset = G.ensure_generated(config.data)
    train = G.split_tasks(config.data, "train")
    records = _shard_records(sorted(dataset.root.glob("train-*.tar")))
    assert len(records) == 24 and set(train["val_labels"]) == set(records)
    for key, record in records.items():
        assert train["val_labels"][key] == record["labels"], key
    first_of_image = {}
    for key in sorted(records):  # shard order: an image's first caption comes first
        first_of_image.setdefault(records[key].get("image_id", key), key)
    single = sorted(k for k in first_of_image.values() if records[k]["labels"]["num_objects"] == 1)
    assert single and len(single) < len(first_of_image)  # a mix of one- and several-object scenes
    assert len(first_of_image) == (24 if version == 1 else 12)  # v2, v3: two captions per image
    for name in ("colour", "shape"):
        assert train["zero_shot"][name]["keys"] == single
        assert train["zero_shot"][name]["classnames"] == dataset.tasks()["zero_shot"][name]["classnames"]
    assert train["arithmetic"] == []
    stored = dataset.tasks()
    assert G.split_tasks(config.data, "val") == {k: stored[k] for k in ("zero_shot", "val_labels", "arithmetic")}
    with pytest.raises(ValueError, match="split must be one of"):
        G.split_tasks(config.data, "test")
