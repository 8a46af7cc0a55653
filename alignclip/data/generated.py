"""The built-in dataset: procedurally rendered scenes with compositional captions, written as real shards.

A scene holds one or two objects, each with a colour (6), a shape (5) and a size (2), on a varied, desaturated
background (a tinted grey with a gradient and pixel noise, so it is never mistaken for an object's colour). The
caption says exactly what was drawn: ``"a small red circle"`` or ``"a small red circle left of a large blue
square"`` (the relation follows the objects' centres: the dominant axis of their offset). Two objects always differ
in colour.

Everything is a pure function of (seed, split, index): the same config renders byte-identical shards. Ground truth
comes with it (``tasks.json`` next to the shards, and ``zero_shot_tasks()`` here):

* zero-shot classification by colour and by shape, on the single-object validation samples, with prompt ensembles
  over the other attributes ("a small {} circle", ...) in the words the captions use;
* multimodal arithmetic: validation sample ``2k + 1`` is sample ``2k`` with one attribute word of its first object
  swapped (colour or shape) and everything else identical, so ``image(2k) + text(to) - text(from)`` has a known
  target image.

The training split's labels come from ``split_tasks(data_cfg, "train")``, computed from the scenes without
rendering: the fitting set of a linear probe (CLIP_benchmark fits it on the train split, scores it on the test split).

Version 2 (``data.generated.version: 2``) puts an information imbalance between the modalities, the trigger of
the modality gap according to Schrodi et al. (2025, "Two effects, one trigger", arXiv:2404.07983): a scene holds
1..``max_objects`` objects on a patterned background (plain, striped, dotted, checked), and each caption names only
part of it. The knob ``caption_coverage`` (c) is the chance that each optional fact is named: every other object,
every size word, the background. The caption's subject (colour and shape) is always named, so c = 1 describes the
whole scene and c = 0 one object only. A training image gets ``captions_per_image`` captions (one sample each,
spread over the epoch), each with another subject and another draw of the facts, so no caption says all the image
holds. Liang et al. (2022, "Mind the Gap", arXiv:2203.02053) name the other cause, the cone effect of
initialisation and temperature, which both versions leave to the model. Validation images get one caption each.

Version 3 draws version 2's scenes and facts with the same draws but names every named object by its shape, the
noun, as real captions name objects, and its colour word only with probability ``colour_coverage``: captions that
name colour as often as shape let a tiny text tower settle on colour and starve shape (docs/study.md).
"""

from __future__ import annotations

import fcntl
import io
import itertools
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image, ImageDraw

from alignclip.data.writer import ShardWriter, sample_key
from alignclip.fs import atomic_write

# The versions a config may ask for (data.generated.version). Change a version's rendering only with a new number,
# so cached shards of another rendering are never reused (the cache folder is named after the version).
GENERATOR_VERSIONS = (1, 2, 3)
GENERATOR_VERSION = 1  # the version written when none is asked for (the schema's default, tools/make_shards.py)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "green": (30, 160, 50),
    "blue": (35, 75, 225),
    "yellow": (240, 215, 30),
    "purple": (140, 50, 190),
    "orange": (250, 135, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
SIZES = {"small": (0.09, 0.11), "large": (0.17, 0.20)}  # radius as a fraction of the image side
# v2 draws larger objects: a tiny ViT's 8 px patches must see a shape's edges to tell shapes apart (at v1's sizes
# the embedded CLIP stayed at chance on shape).
SIZES_V2 = {"small": (0.12, 0.14), "large": (0.19, 0.22)}
RELATIONS = ("left of", "right of", "above", "below")
COLOUR_JITTER = 14  # per-channel uniform jitter of an object's colour, in 0..255 units
MARGIN = 0.07  # keep objects this far (fraction of the side) from the border: the random crop may cut 5%
SUPERSAMPLE = 2  # draw at 2x and downsample: anti-aliased edges
JPEG_QUALITY = 95
SINGLE_OBJECT_FRACTION = 0.5
SPLIT_IDS = {"train": 0, "val": 1}
PATTERNS = ("plain", "striped", "dotted", "checked")  # v2 backgrounds, +-PATTERN_CONTRAST grey levels
PATTERN_CONTRAST = 22.0
CAPTION_STREAM = 1000  # v2: caption j of a scene draws from rng stream CAPTION_STREAM + j (scene draws: stream 0)


@dataclass
class SceneObject:
    colour: str
    shape: str
    size: str
    cx: float  # centre, in [0, 1] image coordinates (x right, y down)
    cy: float
    radius: float  # fraction of the side
    rgb: tuple[int, int, int]  # the jittered colour actually drawn


@dataclass
class Scene:
    objects: list[SceneObject]
    relation: str  # "" for one object; else how objects[0] relates to objects[1]
    background: tuple[int, int, int]
    gradient: tuple[float, float, float]  # (direction x, direction y, strength in 0..255 units)
    noise_seed: int
    noise_std: float
    image_size: int
    pattern: str = ""  # v2: one of PATTERNS; "" (v1) draws no pattern

    def caption(self) -> str:
        """The v1 caption: everything drawn (v2 captions come from ``partial_caption``)."""
        words = [f"a {o.size} {o.colour} {o.shape}" for o in self.objects]
        return words[0] if len(words) == 1 else f"{words[0]} {self.relation} {words[1]}"

    def labels(self) -> dict[str, int]:
        first = self.objects[0]
        return {"colour": list(COLOURS).index(first.colour), "shape": SHAPES.index(first.shape),
                "size": list(SIZES).index(first.size), "num_objects": len(self.objects)}

    def to_json(self, caption: str | None = None) -> dict:
        scene = asdict(self)
        if not self.pattern:  # v1 records stay byte-identical to those written before v2 existed
            del scene["pattern"]
        return {"caption": self.caption() if caption is None else caption, "labels": self.labels(), "scene": scene}


# --------------------------------------------------------------------------------------------- sampling
def _relation(a: SceneObject, b: SceneObject) -> str:
    dx, dy = b.cx - a.cx, b.cy - a.cy
    if abs(dx) >= abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"


def _sample_object(rng: np.random.Generator, colour: str, sizes: dict = SIZES) -> SceneObject:
    size = list(sizes)[int(rng.integers(len(sizes)))]
    lo, hi = sizes[size]
    radius = float(rng.uniform(lo, hi))
    low, high = MARGIN + radius, 1.0 - MARGIN - radius
    jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
    rgb = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[colour], jitter))
    return SceneObject(colour, SHAPES[int(rng.integers(len(SHAPES)))], size, float(rng.uniform(low, high)),
                       float(rng.uniform(low, high)), radius, rgb)  # type: ignore[arg-type]


def _apart(a: SceneObject, b: SceneObject) -> bool:
    return math.hypot(b.cx - a.cx, b.cy - a.cy) > a.radius + b.radius + 0.04


def sample_scene(rng: np.random.Generator, image_size: int, num_objects: int | None = None,
                 version: int = 1, max_objects: int = 3) -> Scene:
    if num_objects is None:
        if version == 1:
            num_objects = 1 if rng.random() < SINGLE_OBJECT_FRACTION else 2
        else:
            num_objects = int(rng.integers(1, max_objects + 1))
    colours = [list(COLOURS)[i] for i in rng.permutation(len(COLOURS))[:num_objects]]
    for _ in range(10_000):  # rejection: objects apart (v1: a clear dominant axis, so the relation is unambiguous)
        objects = [_sample_object(rng, c, SIZES if version == 1 else SIZES_V2) for c in colours]
        if num_objects == 1:
            break
        if version == 1:
            a, b = objects
            dx, dy = abs(b.cx - a.cx), abs(b.cy - a.cy)
            if _apart(a, b) and max(dx, dy) > 1.5 * min(dx, dy):
                break
        elif all(_apart(a, b) for i, a in enumerate(objects) for b in objects[i + 1:]):
            break
    else:
        raise ValueError(f"could not place {num_objects} objects apart on one image; lower max_objects")
    grey = rng.uniform(0.2, 0.85) * 255
    tint = rng.uniform(-0.08, 0.08, size=3) * 255  # low saturation: never an object colour
    background = tuple(int(np.clip(grey + t, 0, 255)) for t in tint)
    angle = rng.uniform(0, 2 * math.pi)
    gradient = (math.cos(angle), math.sin(angle), float(rng.uniform(0, 40)))
    relation = _relation(*objects) if version == 1 and num_objects == 2 else ""
    scene = Scene(objects, relation, background, gradient, int(rng.integers(2**31)),  # type: ignore[arg-type]
                  float(rng.uniform(0, 10)), image_size)
    if version >= 2:
        scene.pattern = PATTERNS[int(rng.integers(len(PATTERNS)))]
    return scene


def partial_caption(scene: Scene, rng: np.random.Generator, coverage: float, subject: int = 0,
                    full_subject: bool = False, colour_coverage: float | None = None) -> str:
    """A v2 caption naming part of the scene. Each named object gets its colour and shape with probability
    ``coverage``, else one of the two (a coin flip: "a red shape", "a circle"), and its size word with probability
    ``coverage``; the subject is always named, each other object and the background with probability
    ``coverage``. ``full_subject`` names the subject's colour and shape always (validation captions, so the
    arithmetic's swapped word is in them).

    The draws depend on the rng only, never on the attribute values, so a scene with one word swapped
    (``swap_attribute``) gets the same caption with that word swapped (the arithmetic ground truth).

    ``colour_coverage`` (v3) names every named object by its shape, the noun, as real captions name objects, and
    gives its colour word with that probability only (the same draws, so v2 captions are unchanged)."""
    order = [subject] + [i for i in range(len(scene.objects)) if i != subject]
    n = len(order)
    named_sizes, named_others, both, colour_only = (rng.random(n) < coverage, rng.random(n) < coverage,
                                                   rng.random(n) < coverage, rng.random(n) < 0.5)
    named_background = rng.random() < coverage
    if colour_coverage is not None:  # v3: the shape always, the colour word with its own chance (drawn last)
        both, colour_only = rng.random(n) < colour_coverage, np.zeros(n, dtype=bool)
    if full_subject:
        both[0] = True

    def phrase(k: int) -> str:
        o = scene.objects[order[k]]
        words = ([o.size] if named_sizes[k] else []) + ([o.colour] if both[k] or colour_only[k] else [])
        words.append(o.shape if both[k] or not colour_only[k] else "shape")
        return f"{'an' if words[0][0] in 'aeiou' else 'a'} {' '.join(words)}"

    others = [phrase(k) for k in range(1, n) if named_others[k]]
    text = phrase(0) + (" with " + " and ".join(others) if others else "")
    if named_background and scene.pattern:
        text += f" on a {scene.pattern} background"
    return text


def swap_attribute(scene: Scene, attribute: str, new_value: str) -> Scene:
    """The same scene with object 0's colour or shape replaced (position, size, background unchanged)."""
    first = scene.objects[0]
    if attribute == "colour":
        delta = [c - n for c, n in zip(first.rgb, COLOURS[first.colour])]  # keep the same jitter
        rgb = tuple(int(np.clip(n + d, 0, 255)) for n, d in zip(COLOURS[new_value], delta))
        first = replace(first, colour=new_value, rgb=rgb)
    elif attribute == "shape":
        first = replace(first, shape=new_value)
    else:
        raise ValueError(f"attribute must be 'colour' or 'shape', got {attribute!r}")
    return replace(scene, objects=[first] + scene.objects[1:])


# -------------------------------------------------------------------------------------------- rendering
def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":  # equilateral, pointing up, a little larger so its area is close to the others'
        r *= 1.2
        return [(cx, cy - r), (cx + 0.866 * r, cy + 0.5 * r), (cx - 0.866 * r, cy + 0.5 * r)]
    if shape == "diamond":
        r *= 1.15
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    raise ValueError(shape)


def _pattern(name: str, side: int, seed: int) -> np.ndarray:
    """A grey-level pattern in {-1, +1} ([side, side]): stripes, dots or checks, with a seeded period and phase."""
    rng = np.random.default_rng([seed, 1])
    period = side * float(rng.uniform(0.12, 0.2))
    offset = rng.uniform(0, period, size=2).astype(np.float32)[:, None, None]
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) + offset
    if name == "striped":
        angle = float(rng.uniform(0, math.pi))
        along = x * math.cos(angle) + y * math.sin(angle)
        return np.where((along // (period / 2)) % 2 == 0, 1.0, -1.0).astype(np.float32)
    if name == "checked":
        return np.where(((x // period) + (y // period)) % 2 == 0, 1.0, -1.0).astype(np.float32)
    if name == "dotted":
        dx, dy = x % period - period / 2, y % period - period / 2
        return np.where(np.hypot(dx, dy) < period * 0.22, -1.0, 0.3).astype(np.float32)
    raise ValueError(f"unknown background pattern {name!r}; expected one of {PATTERNS}")


def render(scene: Scene) -> Image.Image:
    """Draw the scene (numpy background, PIL shapes at 2x, box-downsampled)."""
    side = scene.image_size * SUPERSAMPLE
    ramp = np.linspace(-0.5, 0.5, side, dtype=np.float32)
    gx, gy, strength = scene.gradient
    shade = (gx * ramp[None, :] + gy * ramp[:, None]) * strength
    noise = np.random.default_rng(scene.noise_seed).normal(0, scene.noise_std, (side, side, 1)).astype(np.float32)
    pixels = np.asarray(scene.background, np.float32)[None, None, :] + shade[..., None] + noise
    if scene.pattern and scene.pattern != "plain":
        pixels += PATTERN_CONTRAST * _pattern(scene.pattern, side, scene.noise_seed)[..., None]
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        cx, cy, r = obj.cx * side, obj.cy * side, obj.radius * side
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=obj.rgb)
        elif obj.shape == "square":
            h = r * 0.886  # same area as the circle
            draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=obj.rgb)
        elif obj.shape == "cross":
            arm = r * 0.38
            draw.rectangle([cx - r, cy - arm, cx + r, cy + arm], fill=obj.rgb)
            draw.rectangle([cx - arm, cy - r, cx + arm, cy + r], fill=obj.rgb)
        else:
            draw.polygon(_polygon(obj.shape, cx, cy, r), fill=obj.rgb)
    return img.reduce(SUPERSAMPLE)


def jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLIT_IDS[split], index])


@dataclass(frozen=True)
class Recipe:
    """What a generator version draws and says (the ``data.generated`` keys beyond sizes and seed)."""

    version: int = 1
    caption_coverage: float = 0.5
    captions_per_image: int = 1
    max_objects: int = 2
    colour_coverage: float | None = None  # v3 only

    @classmethod
    def of(cls, g) -> "Recipe":
        if g.version == 1:
            return cls()
        colour = float(g.colour_coverage) if g.version >= 3 else None
        return cls(g.version, float(g.caption_coverage), int(g.captions_per_image), int(g.max_objects), colour)

    def scene(self, rng: np.random.Generator, image_size: int) -> Scene:
        return sample_scene(rng, image_size, version=self.version, max_objects=self.max_objects)

    def caption(self, scene: Scene, seed: int, split: str, index: int, which: int = 0) -> str:
        """Caption ``which`` of scene ``index`` (v1: the full description; v2: a partial one with subject
        ``which`` mod the number of objects)."""
        if self.version == 1:
            return scene.caption()
        rng = np.random.default_rng([seed, SPLIT_IDS[split], index, CAPTION_STREAM + which])
        return partial_caption(scene, rng, self.caption_coverage, which % len(scene.objects),
                               full_subject=split == "val", colour_coverage=self.colour_coverage)


V1 = Recipe()


# --------------------------------------------------------------------------------------- zero-shot tasks
def zero_shot_tasks(version: int = 1) -> dict[str, dict]:
    """Class names and prompt templates per task; a template ensemble spans the attributes not being asked
    (v2 captions may leave the size out, so its templates come with and without a size word; v3 captions mostly
    leave the colour out, so its shape templates come without one too)."""
    sizes = [f"{size} " for size in SIZES] + ([""] if version >= 2 else [])
    colour_templates = [f"a {size}{{}} {shape}" for size in sizes for shape in SHAPES]
    colours = [f"{colour} " for colour in COLOURS] + ([""] if version >= 3 else [])
    shape_templates = [f"a {size}{colour}{{}}" for size in sizes for colour in colours]
    return {
        "colour": {"classnames": list(COLOURS), "templates": colour_templates, "label": "colour"},
        "shape": {"classnames": list(SHAPES), "templates": shape_templates, "label": "shape"},
    }


# ---------------------------------------------------------------------------------------- split writing
def _val_scene(seed: int, index: int, image_size: int, recipe: Recipe = V1) -> tuple[Scene, str, dict | None]:
    """Validation sample 2k is a fresh scene; 2k + 1 is 2k with one word of object 0 swapped (the arithmetic),
    captioned by the same draws as 2k, so the two captions differ in that word only."""
    source_index = index - index % 2
    source = recipe.scene(scene_rng(seed, "val", source_index), image_size)
    if index % 2 == 0:
        return source, recipe.caption(source, seed, "val", source_index), None
    rng = scene_rng(seed, "val", index)
    attribute = "colour" if rng.random() < 0.5 else "shape"
    old = getattr(source.objects[0], attribute)
    taken = {o.colour for o in source.objects}  # objects keep distinct colours
    pool = [c for c in COLOURS if c not in taken] if attribute == "colour" else [s for s in SHAPES if s != old]
    new = pool[int(rng.integers(len(pool)))]
    target = swap_attribute(source, attribute, new)
    return target, recipe.caption(target, seed, "val", source_index), {"attribute": attribute, "from": old, "to": new}


def _image_count(total: int, recipe: Recipe) -> int:
    return -(-total // recipe.captions_per_image)


def _train_sample(seed: int, index: int, total: int, image_size: int, recipe: Recipe) -> tuple[Scene, str, int]:
    """Sample ``index`` of ``total``: image ``index mod n_images`` with its caption ``index div n_images``, so an
    image's captions are an epoch apart in the shard order (never neighbours in a shuffle buffer)."""
    n_images = _image_count(total, recipe)
    image, which = index % n_images, index // n_images
    scene = recipe.scene(scene_rng(seed, "train", image), image_size)
    return scene, recipe.caption(scene, seed, "train", image, which), image


@dataclass
class SplitSample:
    """One sample of a split as ``write_split`` writes it, before rendering."""

    shard: int
    index: int  # position in the split (shard-major)
    key: str
    scene: Scene
    caption: str
    image_id: int  # train: the image it shows (v2 repeats an image per caption); val: ``index``
    arithmetic: dict | None  # val 2k + 1: the arithmetic query it is the target of

    @property
    def first_of_image(self) -> bool:
        return self.image_id == self.index


def split_samples(split: str, num_shards: int, samples_per_shard: int, image_size: int, seed: int,
                  recipe: Recipe = V1) -> Iterator[SplitSample]:
    """Every sample of a split in shard order, with the key ``write_split`` gives it; scenes are sampled, not
    rendered (cheap: the ground truth of a split needs no pixels)."""
    total = num_shards * samples_per_shard
    for shard in range(num_shards):
        for i in range(samples_per_shard):
            index = shard * samples_per_shard + i
            key = sample_key(shard, i, samples_per_shard)
            image_id, query = index, None
            if split == "val":
                scene, caption, swap = _val_scene(seed, index, image_size, recipe)
                if swap is not None:
                    source = sample_key(*divmod(index - 1, samples_per_shard), samples_per_shard)
                    query = dict(swap, source=source, target=key)
            else:
                scene, caption, image_id = _train_sample(seed, index, total, image_size, recipe)
            yield SplitSample(shard, index, key, scene, caption, image_id, query)


def _recorded(samples: Iterable[SplitSample], truth: dict) -> Iterator[SplitSample]:
    """Pass the samples through, noting each one's labels and arithmetic query in ``truth``."""
    for sample in samples:
        truth["labels"][sample.key] = sample.scene.labels()
        if sample.arithmetic is not None:
            truth["arithmetic"].append(sample.arithmetic)
        yield sample


def write_split(out_dir: str | Path, split: str, num_shards: int, samples_per_shard: int, image_size: int,
                seed: int, prefix: str | None = None, recipe: Recipe = V1) -> dict:
    """Render a split into ``<prefix>NNNNN.tar`` shards (skipping complete ones); returns its ground truth."""
    out_dir = Path(out_dir)
    prefix = f"{split}-" if prefix is None else prefix
    truth: dict = {"labels": {}, "arithmetic": []}
    samples = _recorded(split_samples(split, num_shards, samples_per_shard, image_size, seed, recipe), truth)
    for shard, in_shard in itertools.groupby(samples, key=lambda s: s.shard):
        path = out_dir / f"{prefix}{shard:05d}.tar"
        writer = None if path.exists() else ShardWriter(path)
        try:
            for sample in in_shard:  # the truth is noted for kept shards too
                if writer is not None:
                    record = dict(sample.scene.to_json(sample.caption), key=sample.key, status="success")
                    if recipe.version >= 2:
                        record["image_id"] = sample.image_id
                    writer.write(sample.key, {"jpg": jpeg_bytes(render(sample.scene)), "txt": sample.caption,
                                              "json": record})
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        if writer is not None:
            writer.close()
    return truth


def _split_size(g, split: str) -> tuple[int, int]:
    """(shards, samples per shard) of a split of ``data.generated``."""
    if split not in SPLIT_IDS:
        raise ValueError(f"split must be one of {list(SPLIT_IDS)}, got {split!r}")
    return (g.num_shards, g.samples_per_shard) if split == "train" else (1, g.val_samples)


def _task_layout(truth: dict, image_keys: list[str], version: int) -> dict:
    """A split's ground truth in the tasks-JSON layout: zero-shot colour / shape over the single-object images
    among ``image_keys``, the labels (under "val_labels", the key alignclip.embeddings reads) and arithmetic."""
    single = [k for k in image_keys if truth["labels"][k]["num_objects"] == 1]
    return {"zero_shot": {name: dict(task, keys=single) for name, task in zero_shot_tasks(version).items()},
            "val_labels": truth["labels"], "arithmetic": truth["arithmetic"]}


def train_images(data_cfg) -> int:
    """Images in the train split: its first this-many samples show each image once, with its first caption (v2
    writes image i's captions at samples i, i + n, i + 2n, ...)."""
    g = data_cfg.generated
    return _image_count(g.num_shards * g.samples_per_shard, Recipe.of(g))


def split_tasks(data_cfg, split: str) -> dict:
    """The ground truth of a split of the generated dataset of ``data_cfg`` in the tasks-JSON layout, from the
    scenes alone (no rendering, no shards needed), so datasets cached before this existed get it too.

    For "val" it equals the tasks.json entries. For "train" (a linear probe's fitting set, as CLIP_benchmark fits
    on the train split) the zero-shot keys hold each single-object image once, at its first caption's sample: v2
    writes an image once per caption, and the probe should weigh every image alike. Train has no arithmetic."""
    g = data_cfg.generated
    check_generated_config(g)
    truth: dict = {"labels": {}, "arithmetic": []}
    samples = split_samples(split, *_split_size(g, split), g.image_size, g.seed, Recipe.of(g))
    image_keys = [s.key for s in _recorded(samples, truth) if s.first_of_image]
    return _task_layout(truth, image_keys, g.version)


@dataclass
class GeneratedDataset:
    root: Path
    num_shards: int
    val_shards: int = 1

    def spec(self, split: str) -> str:
        n = self.num_shards if split == "train" else self.val_shards
        return str(self.root / f"{split}-{{00000..{n - 1:05d}}}.tar")

    @property
    def tasks_path(self) -> Path:
        return self.root / "tasks.json"

    def tasks(self) -> dict:
        return json.loads(self.tasks_path.read_text())


def dataset_dir(data_cfg) -> Path:
    from alignclip.paths import cache_dir

    g = data_cfg.generated
    base = Path(data_cfg.cache_dir) if data_cfg.cache_dir else cache_dir("generated")
    tag = f"v{g.version}-seed{g.seed}-{g.num_shards}x{g.samples_per_shard}-val{g.val_samples}-px{g.image_size}"
    if g.version >= 2:
        tag += f"-cov{g.caption_coverage:g}-cap{g.captions_per_image}-obj{g.max_objects}"
    if g.version >= 3:
        tag += f"-col{g.colour_coverage:g}"
    return base / tag


def check_generated_config(g) -> None:
    """Every data.generated key in range, or a ConfigError naming it."""
    from alignclip.config import ConfigError

    if g.version not in GENERATOR_VERSIONS:
        raise ConfigError(f"key 'data.generated.version' must be one of {list(GENERATOR_VERSIONS)}, got {g.version}")
    for key in ("num_shards", "samples_per_shard", "image_size", "val_samples", "captions_per_image"):
        if getattr(g, key) <= 0:
            raise ConfigError(f"key 'data.generated.{key}' must be > 0, got {getattr(g, key)}")
    for key in ("caption_coverage", "colour_coverage"):
        if not 0.0 <= getattr(g, key) <= 1.0:
            raise ConfigError(f"key 'data.generated.{key}' must be in [0, 1], got {getattr(g, key)}")
    if not 1 <= g.max_objects <= 3:
        raise ConfigError(f"key 'data.generated.max_objects' must be in 1..3, got {g.max_objects}")


def _recorded_config(g) -> dict:
    """The data.generated keys tasks.json records; v1 and v2 files stay byte-identical to those written before v3's
    key existed."""
    config = asdict(g) if hasattr(g, "__dataclass_fields__") else dict(g)
    if g.version < 3:
        config.pop("colour_coverage", None)
    return config


def ensure_generated(data_cfg) -> GeneratedDataset:
    """Render the generated dataset of ``data.generated`` under the cache dir unless it is already complete.

    Safe when several ranks call it at once: one renders under a file lock, the others wait and reuse.
    ``tasks.json`` is written last, so its presence marks a complete dataset.
    """
    g = data_cfg.generated
    check_generated_config(g)
    root = dataset_dir(data_cfg)
    dataset = GeneratedDataset(root, g.num_shards)
    if dataset.tasks_path.exists():
        return dataset
    root.mkdir(parents=True, exist_ok=True)
    recipe = Recipe.of(g)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not dataset.tasks_path.exists():
            write_split(root, "train", *_split_size(g, "train"), g.image_size, g.seed, recipe=recipe)
            val = write_split(root, "val", *_split_size(g, "val"), g.image_size, g.seed, recipe=recipe)
            tasks = {
                "generator_version": g.version,
                "config": _recorded_config(g),
                "train": dataset.spec("train"),
                "val": dataset.spec("val"),
                **_task_layout(val, list(val["labels"]), g.version),  # every validation sample is its own image
                "classes": {"colour": list(COLOURS), "shape": list(SHAPES), "size": list(SIZES),
                            **({"pattern": list(PATTERNS)} if g.version >= 2 else {})},
            }
            atomic_write(dataset.tasks_path, json.dumps(tasks, indent=1))
    return dataset
