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
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from alignclip.data.writer import ShardWriter, atomic_write_bytes, sample_key

GENERATOR_VERSION = 1  # bump when rendering changes, so cached shards of an older version are not reused

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
RELATIONS = ("left of", "right of", "above", "below")
COLOUR_JITTER = 14  # per-channel uniform jitter of an object's colour, in 0..255 units
MARGIN = 0.07  # keep objects this far (fraction of the side) from the border: the random crop may cut 5%
SUPERSAMPLE = 2  # draw at 2x and downsample: anti-aliased edges
JPEG_QUALITY = 95
SINGLE_OBJECT_FRACTION = 0.5
SPLIT_IDS = {"train": 0, "val": 1}


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

    def caption(self) -> str:
        words = [f"a {o.size} {o.colour} {o.shape}" for o in self.objects]
        return words[0] if len(words) == 1 else f"{words[0]} {self.relation} {words[1]}"

    def labels(self) -> dict[str, int]:
        first = self.objects[0]
        return {"colour": list(COLOURS).index(first.colour), "shape": SHAPES.index(first.shape),
                "size": list(SIZES).index(first.size), "num_objects": len(self.objects)}

    def to_json(self) -> dict:
        return {"caption": self.caption(), "labels": self.labels(), "scene": asdict(self)}


# --------------------------------------------------------------------------------------------- sampling
def _relation(a: SceneObject, b: SceneObject) -> str:
    dx, dy = b.cx - a.cx, b.cy - a.cy
    if abs(dx) >= abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"


def _sample_object(rng: np.random.Generator, colour: str) -> SceneObject:
    size = list(SIZES)[int(rng.integers(len(SIZES)))]
    lo, hi = SIZES[size]
    radius = float(rng.uniform(lo, hi))
    low, high = MARGIN + radius, 1.0 - MARGIN - radius
    jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
    rgb = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[colour], jitter))
    return SceneObject(colour, SHAPES[int(rng.integers(len(SHAPES)))], size, float(rng.uniform(low, high)),
                       float(rng.uniform(low, high)), radius, rgb)  # type: ignore[arg-type]


def sample_scene(rng: np.random.Generator, image_size: int, num_objects: int | None = None) -> Scene:
    if num_objects is None:
        num_objects = 1 if rng.random() < SINGLE_OBJECT_FRACTION else 2
    colours = [list(COLOURS)[i] for i in rng.permutation(len(COLOURS))[:num_objects]]
    while True:  # rejection: two objects apart, with a clear dominant axis so the relation word is unambiguous
        objects = [_sample_object(rng, c) for c in colours]
        if num_objects == 1:
            break
        a, b = objects
        dx, dy = abs(b.cx - a.cx), abs(b.cy - a.cy)
        if math.hypot(dx, dy) > a.radius + b.radius + 0.04 and max(dx, dy) > 1.5 * min(dx, dy):
            break
    grey = rng.uniform(0.2, 0.85) * 255
    tint = rng.uniform(-0.08, 0.08, size=3) * 255  # low saturation: never an object colour
    background = tuple(int(np.clip(grey + t, 0, 255)) for t in tint)
    angle = rng.uniform(0, 2 * math.pi)
    gradient = (math.cos(angle), math.sin(angle), float(rng.uniform(0, 40)))
    return Scene(objects, _relation(*objects) if num_objects == 2 else "", background,  # type: ignore[arg-type]
                 gradient, int(rng.integers(2**31)), float(rng.uniform(0, 10)), image_size)


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


def render(scene: Scene) -> Image.Image:
    """Draw the scene (numpy background, PIL shapes at 2x, box-downsampled)."""
    side = scene.image_size * SUPERSAMPLE
    ramp = np.linspace(-0.5, 0.5, side, dtype=np.float32)
    gx, gy, strength = scene.gradient
    shade = (gx * ramp[None, :] + gy * ramp[:, None]) * strength
    noise = np.random.default_rng(scene.noise_seed).normal(0, scene.noise_std, (side, side, 1)).astype(np.float32)
    pixels = np.asarray(scene.background, np.float32)[None, None, :] + shade[..., None] + noise
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


# --------------------------------------------------------------------------------------- zero-shot tasks
def zero_shot_tasks() -> dict[str, dict]:
    """Class names and prompt templates per task; a template ensemble spans the attributes not being asked."""
    colour_templates = [f"a {size} {{}} {shape}" for size in SIZES for shape in SHAPES]
    shape_templates = [f"a {size} {colour} {{}}" for size in SIZES for colour in COLOURS]
    return {
        "colour": {"classnames": list(COLOURS), "templates": colour_templates, "label": "colour"},
        "shape": {"classnames": list(SHAPES), "templates": shape_templates, "label": "shape"},
    }


# ---------------------------------------------------------------------------------------- split writing
def _val_scene(seed: int, index: int, image_size: int) -> tuple[Scene, dict | None]:
    """Validation sample 2k is a fresh scene; 2k + 1 is 2k with one word of object 0 swapped (the arithmetic)."""
    source = sample_scene(scene_rng(seed, "val", index - index % 2), image_size)
    if index % 2 == 0:
        return source, None
    rng = scene_rng(seed, "val", index)
    attribute = "colour" if rng.random() < 0.5 else "shape"
    old = getattr(source.objects[0], attribute)
    taken = {o.colour for o in source.objects}  # two objects keep distinct colours
    pool = [c for c in COLOURS if c not in taken] if attribute == "colour" else [s for s in SHAPES if s != old]
    new = pool[int(rng.integers(len(pool)))]
    return swap_attribute(source, attribute, new), {"attribute": attribute, "from": old, "to": new}


def write_split(out_dir: str | Path, split: str, num_shards: int, samples_per_shard: int, image_size: int,
                seed: int, prefix: str | None = None) -> dict:
    """Render a split into ``<prefix>NNNNN.tar`` shards (skipping complete ones); returns its ground truth."""
    out_dir = Path(out_dir)
    prefix = f"{split}-" if prefix is None else prefix
    truth: dict = {"labels": {}, "arithmetic": []}
    for shard in range(num_shards):
        path = out_dir / f"{prefix}{shard:05d}.tar"
        writer = None if path.exists() else ShardWriter(path)
        try:
            for i in range(samples_per_shard):
                index = shard * samples_per_shard + i
                key = sample_key(shard, i, samples_per_shard)
                if split == "val":
                    scene, swap = _val_scene(seed, index, image_size)
                    if swap is not None:
                        source = sample_key(*divmod(index - 1, samples_per_shard), samples_per_shard)
                        truth["arithmetic"].append(dict(swap, source=source, target=key))
                else:
                    scene = sample_scene(scene_rng(seed, split, index), image_size)
                truth["labels"][key] = scene.labels()
                if writer is not None:
                    writer.write(key, {"jpg": jpeg_bytes(render(scene)), "txt": scene.caption(),
                                       "json": dict(scene.to_json(), key=key, status="success")})
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        if writer is not None:
            writer.close()
    return truth


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
    tag = f"v{GENERATOR_VERSION}-seed{g.seed}-{g.num_shards}x{g.samples_per_shard}-val{g.val_samples}-px{g.image_size}"
    return base / tag


def ensure_generated(data_cfg) -> GeneratedDataset:
    """Render the generated dataset of ``data.generated`` under the cache dir unless it is already complete.

    Safe when several ranks call it at once: one renders under a file lock, the others wait and reuse.
    ``tasks.json`` is written last, so its presence marks a complete dataset.
    """
    g = data_cfg.generated
    from alignclip.config import ConfigError

    for key in ("num_shards", "samples_per_shard", "image_size", "val_samples"):
        if getattr(g, key) <= 0:
            raise ConfigError(f"key 'data.generated.{key}' must be > 0, got {getattr(g, key)}")
    root = dataset_dir(data_cfg)
    dataset = GeneratedDataset(root, g.num_shards)
    if dataset.tasks_path.exists():
        return dataset
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not dataset.tasks_path.exists():
            write_split(root, "train", g.num_shards, g.samples_per_shard, g.image_size, g.seed)
            val = write_split(root, "val", 1, g.val_samples, g.image_size, g.seed)
            single = [k for k, lab in val["labels"].items() if lab["num_objects"] == 1]
            tasks = {
                "generator_version": GENERATOR_VERSION,
                "config": asdict(g) if hasattr(g, "__dataclass_fields__") else dict(g),
                "train": dataset.spec("train"),
                "val": dataset.spec("val"),
                "zero_shot": {name: dict(task, keys=single) for name, task in zero_shot_tasks().items()},
                "val_labels": val["labels"],
                "arithmetic": val["arithmetic"],
                "classes": {"colour": list(COLOURS), "shape": list(SHAPES), "size": list(SIZES)},
            }
            atomic_write_bytes(dataset.tasks_path, json.dumps(tasks, indent=1).encode())
    return dataset
