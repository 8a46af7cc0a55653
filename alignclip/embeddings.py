"""The embedding cache: encode an image-text set once with a model; every tool then reads the arrays.

A cache is a directory of .npy arrays plus ``meta.json``::

    image.npy            [n, d]  image embeddings (normalised)
    text.npy             [m, d]  caption embeddings; caption j describes image text_to_image[j]
    text_to_image.npy    [m]     int
    zeroshot_<task>_classes.npy [C, d]  template-ensembled class embeddings;  zeroshot_<task>_labels.npy [n] (-1: none)
    arithmetic_{source,target}.npy [q] image indices; arithmetic_{text_a,text_b}.npy [q, d]
    meta.json            keys, captions, class names, and where the arrays came from

``EmbeddingSet.from_arrays`` wraps arrays computed elsewhere (e.g. another CLIP's ``.npy``), so every tool works
on them too. The task ground truth comes in the tasks-JSON layout that the generated dataset writes (tasks.json):
``{"zero_shot": {task: {classnames, templates, label, keys}}, "val_labels": {key: {label: int}},
"arithmetic": [{source: key, target: key, from: word, to: word}]}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from alignclip.analysis.metrics import as_numpy
from alignclip.prompts import build_classifier


class CacheError(ValueError):
    """An embedding cache (or foreign .npy) whose arrays would give wrong figures; the message names it."""


@dataclass
class ZeroShotTask:
    classnames: list[str]
    class_embeddings: np.ndarray  # [C, d]
    labels: np.ndarray  # [n] class of each image, -1 where the image has no label for this task


@dataclass
class ArithmeticTask:
    source: np.ndarray  # [q] image index of the query
    target: np.ndarray  # [q] image index of the ground-truth result
    text_a: np.ndarray  # [q, d] the text subtracted
    text_b: np.ndarray  # [q, d] the text added


@dataclass
class EmbeddingSet:
    image: np.ndarray
    text: np.ndarray
    text_to_image: np.ndarray
    keys: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    zeroshot: dict[str, ZeroShotTask] = field(default_factory=dict)
    arithmetic: ArithmeticTask | None = None
    meta: dict = field(default_factory=dict)

    @classmethod
    def from_arrays(cls, image, text, text_to_image=None, **kwargs) -> "EmbeddingSet":
        image, text = as_numpy(image), as_numpy(text)
        owner = np.arange(len(text)) if text_to_image is None else np.asarray(text_to_image, dtype=np.int64)
        if text_to_image is None and len(image) != len(text):
            raise ValueError(f"{len(image)} images and {len(text)} captions: pass text_to_image for several "
                             f"captions per image")
        return cls(image, text, owner, **kwargs)

    def validate(self, where: str = "embedding set", unit_norm: bool = False) -> "EmbeddingSet":
        """Raise CacheError naming ``where`` unless the arrays can be trusted: 2-D, one width, finite, no zero row,
        caption owners inside [0, images) (a negative index would silently wrap), unit rows when ``unit_norm``
        (a cache holds normalised embeddings; anything else means it was written by something else)."""
        for name, arr in (("image", self.image), ("text", self.text)):
            if arr.ndim != 2 or not len(arr):
                raise CacheError(f"{where}: {name} embeddings must be a non-empty [n, d] array, found {arr.shape}")
            bad = np.flatnonzero(~np.isfinite(arr).all(axis=1))
            if len(bad):
                raise CacheError(f"{where}: {name} embeddings hold NaN or inf (row {bad[0]}, {len(bad)} rows)")
            norms = np.linalg.norm(arr, axis=1)
            if (norms < 1e-6).any():
                raise CacheError(f"{where}: {name} embedding row {int(np.argmax(norms < 1e-6))} is all zeros")
            off = np.flatnonzero(np.abs(norms - 1) > 1e-3)
            if unit_norm and len(off):
                raise CacheError(f"{where}: {name} embedding row {off[0]} has norm {norms[off[0]]:.4f}; a cache "
                                 f"holds L2-normalised rows ({len(off)} rows are not)")
        if self.image.shape[1] != self.text.shape[1]:
            raise CacheError(f"{where}: image width {self.image.shape[1]} != text width {self.text.shape[1]}")
        owner = self.text_to_image
        if owner.shape != (len(self.text),) or not np.issubdtype(owner.dtype, np.integer):
            raise CacheError(f"{where}: text_to_image must hold one integer per caption ({len(self.text)}), "
                             f"found {owner.dtype} {owner.shape}")
        out = np.flatnonzero((owner < 0) | (owner >= len(self.image)))
        if len(out):
            raise CacheError(f"{where}: text_to_image[{out[0]}] = {owner[out[0]]} is outside [0, {len(self.image)}) "
                             f"images ({len(out)} entries are)")
        for task_name, task in self.zeroshot.items():
            if task.labels.shape != (len(self.image),):
                raise CacheError(f"{where}: zero-shot task {task_name!r} has {len(task.labels)} labels for "
                                 f"{len(self.image)} images")
            bad = np.flatnonzero((task.labels < -1) | (task.labels >= len(task.class_embeddings)))
            if len(bad):
                raise CacheError(f"{where}: zero-shot task {task_name!r} label {task.labels[bad[0]]} of image "
                                 f"{bad[0]} is outside [-1, {len(task.class_embeddings)})")
        if self.arithmetic is not None:
            idx = np.concatenate([self.arithmetic.source, self.arithmetic.target])
            if len(idx) and (idx.min() < 0 or idx.max() >= len(self.image)):
                raise CacheError(f"{where}: arithmetic image indices must lie in [0, {len(self.image)})")
        return self

    def pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """(image of each caption, caption): the paired rows the gap metrics and the aligners use."""
        return self.image[self.text_to_image], self.text

    def mapped(self, map_image: Callable, map_text: Callable, name: str = "") -> "EmbeddingSet":
        """The same set with images and every text-side array passed through the given maps."""
        zs = {k: replace(t, class_embeddings=map_text(t.class_embeddings)) for k, t in self.zeroshot.items()}
        ar = None
        if self.arithmetic is not None:
            ar = replace(self.arithmetic, text_a=map_text(self.arithmetic.text_a),
                         text_b=map_text(self.arithmetic.text_b))
        return replace(self, image=map_image(self.image), text=map_text(self.text), zeroshot=zs, arithmetic=ar,
                       meta=dict(self.meta, mapped_by=name))

    # ------------------------------------------------------------------------------------------ storage
    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        arrays = {"image": self.image, "text": self.text, "text_to_image": self.text_to_image}
        for name, task in self.zeroshot.items():
            arrays[f"zeroshot_{name}_classes"] = task.class_embeddings
            arrays[f"zeroshot_{name}_labels"] = task.labels
        if self.arithmetic is not None:
            for part in ("source", "target", "text_a", "text_b"):
                arrays[f"arithmetic_{part}"] = getattr(self.arithmetic, part)
        for name, arr in arrays.items():
            np.save(out / f"{name}.npy", np.asarray(arr))
        meta = dict(self.meta, keys=self.keys, captions=self.captions,
                    zeroshot={k: t.classnames for k, t in self.zeroshot.items()},
                    arithmetic=self.arithmetic is not None)
        (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        return out

    @classmethod
    def load(cls, path: str | Path) -> "EmbeddingSet":
        """A cache directory, or a single ``.npy`` of images whose sibling ``text.npy`` holds the captions."""
        p = Path(path)
        if not (p.is_dir() and (p / "image.npy").is_file()) and not (p.suffix == ".npy" and p.is_file()):
            raise FileNotFoundError(f"{path}: expected an embedding cache directory (image.npy, text.npy, ...), "
                                    f"an image .npy with text.npy beside it, or an exported .safetensors model")
        folder = p if p.is_dir() else p.parent
        if not (folder / "text.npy").is_file():
            raise FileNotFoundError(f"{folder / 'text.npy'} not found: the caption embeddings of {path}")
        meta = json.loads((folder / "meta.json").read_text()) if (folder / "meta.json").is_file() else {}

        def arr(name):  # allow_pickle=False: a cache never runs code
            try:
                return np.load(folder / f"{name}.npy", allow_pickle=False)
            except (OSError, ValueError) as err:
                raise CacheError(f"{folder / (name + '.npy')}: not a readable numpy array ({err})") from None

        image = arr("image") if p.is_dir() else arr(p.stem)
        owner = arr("text_to_image") if (folder / "text_to_image.npy").is_file() else None
        zeroshot = {name: ZeroShotTask(classnames, arr(f"zeroshot_{name}_classes"), arr(f"zeroshot_{name}_labels"))
                    for name, classnames in meta.get("zeroshot", {}).items()}
        arithmetic = None
        if meta.get("arithmetic"):
            arithmetic = ArithmeticTask(*(arr(f"arithmetic_{part}") for part in ("source", "target", "text_a",
                                                                                  "text_b")))
        extra = {k: v for k, v in meta.items() if k not in ("keys", "captions", "zeroshot", "arithmetic")}
        extra.setdefault("source", str(p))
        text = arr("text")
        if owner is None and len(image) != len(text):
            raise CacheError(f"{folder}: {len(image)} images and {len(text)} captions but no text_to_image.npy")
        es = cls.from_arrays(image, text, owner, keys=meta.get("keys", []), captions=meta.get("captions", []),
                             zeroshot=zeroshot, arithmetic=arithmetic, meta=extra)
        # a cache we wrote (meta.json) holds normalised rows; a foreign .npy may not (the metrics normalise)
        return es.validate(str(path), unit_norm=bool(meta))


# ------------------------------------------------------------------------------------------------ encoding
@torch.no_grad()
def encode_texts(model, tokenizer, texts: list[str], batch_size: int = 256, device="cpu",
                 before_batch: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Normalised embeddings of ``texts``, each distinct string encoded once: identical captions get bit-identical
    rows, so they tie exactly in any ranking (a row's last bits otherwise depend on the batch it was encoded in).
    ``before_batch(done, total)`` runs before each batch of distinct texts (it may raise to stop)."""
    distinct, row_of = np.unique(np.array(texts, dtype=str), return_inverse=True)
    out = []
    for i in range(0, len(distinct), batch_size):
        if before_batch is not None:
            before_batch(i, len(distinct))
        tokens = tokenizer(distinct[i:i + batch_size].tolist()).to(device)
        out.append(model.encode_text(tokens, normalize=True).float().cpu())
    return torch.cat(out).numpy()[row_of.reshape(-1)] if out else np.zeros((0, 0), np.float32)


def task_arrays(tasks: dict, keys: list[str], image_captions: list[str], encode: Callable[[list[str]], np.ndarray],
                arithmetic_text: str = "caption") -> tuple[dict[str, ZeroShotTask], ArithmeticTask | None]:
    """Zero-shot classifiers and arithmetic queries of a tasks JSON, aligned to the image ``keys`` (and one
    caption per image, ``image_captions``).

    arithmetic_text="caption": text_a / text_b are the source and target captions (the delta swaps one word in
    context); "word": the swapped words alone."""
    index = {k: i for i, k in enumerate(keys)}
    labels_by_key = tasks.get("val_labels", {})
    zeroshot = {}
    for name, task in tasks.get("zero_shot", {}).items():
        labels = np.full(len(keys), -1, dtype=np.int64)
        for key in task.get("keys", labels_by_key.keys()):
            if key in index and key in labels_by_key:
                labels[index[key]] = labels_by_key[key][task["label"]]
        zeroshot[name] = ZeroShotTask(list(task["classnames"]),
                                      build_classifier(encode, task["classnames"], task["templates"]), labels)
    queries = [q for q in tasks.get("arithmetic", []) if q["source"] in index and q["target"] in index]
    arithmetic = None
    if queries:
        src = np.array([index[q["source"]] for q in queries])
        tgt = np.array([index[q["target"]] for q in queries])
        if arithmetic_text == "caption":
            text_a, text_b = [image_captions[i] for i in src], [image_captions[i] for i in tgt]
        elif arithmetic_text == "word":
            text_a, text_b = [q["from"] for q in queries], [q["to"] for q in queries]
        else:
            raise ValueError(f"arithmetic_text must be 'caption' or 'word', found {arithmetic_text!r}")
        arithmetic = ArithmeticTask(src, tgt, encode(text_a), encode(text_b))
    return zeroshot, arithmetic


@torch.no_grad()
def encode_batches(model, batches: Iterable[dict], device="cpu") -> tuple[np.ndarray, np.ndarray, list, list]:
    """Images and captions of data batches (dict(image, text, caption, key)), one caption per image."""
    model.eval()
    images, texts, keys, captions = [], [], [], []
    for batch in batches:
        images.append(model.encode_image(batch["image"].to(device), normalize=True).float().cpu())
        texts.append(model.encode_text(batch["text"].to(device), normalize=True).float().cpu())
        keys += list(batch["key"])
        captions += list(batch["caption"])
    if not images:
        raise ValueError("no samples to encode: the data source yielded no batch")
    return torch.cat(images).numpy(), torch.cat(texts).numpy(), keys, captions


def encode_dataset(model, tokenizer, batches: Iterable[dict], tasks: dict | None = None, device="cpu",
                   arithmetic_text: str = "caption", meta: dict | None = None) -> EmbeddingSet:
    """Encode every batch; rows sharing a key become one image with several captions; then the tasks' arrays."""
    image, text, keys, captions = encode_batches(model, batches, device)
    es = merge_repeated_images(EmbeddingSet.from_arrays(image, text, keys=keys, captions=captions,
                                                        meta=dict(meta or {}, arithmetic_text=arithmetic_text)))
    if tasks:
        first_caption = {}
        for j, i in enumerate(es.text_to_image):
            first_caption.setdefault(int(i), es.captions[j])
        es.zeroshot, es.arithmetic = task_arrays(
            tasks, es.keys, [first_caption[i] for i in range(len(es.image))],
            lambda t: encode_texts(model, tokenizer, list(t), device=device), arithmetic_text)
    return es


def folder_batches(folder: str | Path, captions_file: str | Path, image_size: int, tokenizer,
                   batch_size: int = 64) -> Iterable[dict]:
    """Batches from a folder of images and a captions file (``filename<TAB>caption`` per line; several lines
    per image give several captions, each paired with that image)."""
    from alignclip.data.images import load_rgb
    from alignclip.data.transforms import eval_transform, normalize_batch

    rows = [line.rstrip("\n").split("\t", 1) for line in Path(captions_file).read_text().splitlines() if line.strip()]
    bad = [r for r in rows if len(r) != 2]
    if bad:
        raise ValueError(f"{captions_file}: expected 'filename<TAB>caption' lines, found {bad[0]!r}")
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        pixels = [eval_transform(load_rgb(Path(folder) / name), image_size) for name, _ in chunk]
        yield {"image": normalize_batch(pixels), "text": tokenizer([c for _, c in chunk]),
               "caption": [c for _, c in chunk], "key": [name for name, _ in chunk]}


def merge_repeated_images(es: EmbeddingSet) -> EmbeddingSet:
    """Collapse rows that share a key (one image listed once per caption) into one image with several captions
    (before any task arrays exist: they index images)."""
    if not es.keys or len(set(es.keys)) == len(es.keys):
        return es
    first: dict[str, int] = {}
    for i, k in enumerate(es.keys):
        first.setdefault(k, len(first))
    keep = np.array(sorted({k: i for i, k in reversed(list(enumerate(es.keys)))}.values()))
    owner = np.array([first[k] for k in es.keys])
    return replace(es, image=es.image[keep], text_to_image=owner, keys=[es.keys[i] for i in keep])


# ------------------------------------------------------------------------------------ sources for the tools
def encode_with_model(model_path: str | Path, data: str = "generated", split: str = "val", folder: str = "",
                      captions: str = "", tasks_path: str = "", limit: int = 0, batch_size: int = 64,
                      arithmetic_text: str = "caption", device: str = "cpu",
                      extra_tasks: dict | None = None) -> EmbeddingSet:
    """Encode an image-text set with a model: our export, or an OpenCLIP / Hugging Face CLIP (alignclip.interop).

    data="generated": the built-in dataset of the model's own config (``split`` val or train), with its ground
    truth (val: tasks.json; train: the labels a linear probe fits on, no arithmetic); data=<shard spec>: those
    shards; or folder + captions file. ``tasks_path`` adds ground truth."""
    from dataclasses import replace as dc_replace

    from alignclip.data import iter_eval_batches
    from alignclip.data.shards import ShardErrors
    from alignclip.interop import open_model
    from alignclip.tokenizer import get_tokenizer

    opened = open_model(model_path, device)
    model, config = opened.model, opened.config
    tokenizer = get_tokenizer(config.model.text.context_length)
    tasks = json.loads(Path(tasks_path).read_text()) if tasks_path else None
    errors = None  # the shards' skip counts, stated with the pairs measured
    if folder:
        if not captions:
            raise ValueError(f"--folder {folder} needs --captions FILE (filename<TAB>caption lines); for a folder "
                             f"of one sub-folder per class use alignclip-eval --benchmark imagefolder")
        batches = folder_batches(folder, captions, config.model.vision.image_size, tokenizer, batch_size)
        source = f"{folder} ({captions})"
    else:
        if data == "generated":
            from alignclip.data.generated import ensure_generated, split_tasks

            config = dc_replace(config, data=dc_replace(config.data, train="generated", val=""))
            dataset = ensure_generated(config.data)
            spec = dataset.spec(split)
            if tasks is None:  # train: labels for a linear probe, each image once (v2 repeats it per caption)
                tasks = dataset.tasks() if split == "val" else split_tasks(config.data, split)
        else:
            spec = data
        errors = ShardErrors()
        batches = iter_eval_batches(config, batch_size, spec=spec, limit=limit, errors=errors)
        source = spec
    if extra_tasks:
        tasks = dict(tasks or {})
        tasks["zero_shot"] = {**tasks.get("zero_shot", {}), **extra_tasks["zero_shot"]}
        labels = {k: dict(v) for k, v in tasks.get("val_labels", {}).items()}
        for key, value in extra_tasks["val_labels"].items():
            labels.setdefault(key, {}).update(value)
        tasks["val_labels"] = labels
    es = encode_dataset(model, tokenizer, batches, tasks, device, arithmetic_text,
                        meta={"model": str(model_path), "source": source, "arch": config.model.arch})
    if errors is not None:
        es.meta["pairs_skipped"] = errors.skipped()
    return es


def tasks_from_files(classnames: str, templates: str, labels: str, task: str = "classes", data: str = "") -> dict:
    """A tasks dict (the tasks-JSON layout) for one zero-shot task from plain files: class names one per line,
    prompt templates one per line (``{c}`` or ``{}`` marks the class name), labels as ``key<TAB>class name`` lines.
    With the shards' spec ``data``, labels keyed by a source file name (the name in the captions file given to
    ``alignclip-make-shards folder``) are re-keyed to the sample keys through the map that command writes beside
    the shards (``sources.tsv``)."""
    from alignclip.data.writer import source_keys

    names = [line.strip() for line in Path(classnames).read_text().splitlines() if line.strip()]
    prompts = [line.rstrip("\n") for line in Path(templates).read_text().splitlines() if line.strip()]
    index = {name: i for i, name in enumerate(names)}
    by_source = source_keys(data) if data else {}
    val_labels = {}
    for line in Path(labels).read_text().splitlines():
        if not line.strip():
            continue
        key, _, name = line.partition("\t")
        if name.strip() not in index:
            raise ValueError(f"{labels}: class {name.strip()!r} of {key!r} is not in {classnames}")
        val_labels[by_source.get(key.strip(), key.strip())] = {task: index[name.strip()]}
    return {"zero_shot": {task: {"classnames": names, "templates": prompts, "label": task,
                                 "keys": list(val_labels)}}, "val_labels": val_labels}


@dataclass(frozen=True)
class SourceOptions:
    """How to encode a source that is an exported model (a cache needs none): the image-text set, its tasks, the
    encoding and where to keep the result. The commands fill it from their shared flags
    (``alignclip.commands.sources``)."""

    data: str = "generated"  # 'generated' (the built-in set) or a shard spec
    split: str = "val"
    folder: str = ""  # images (with ``captions``) instead of shards
    captions: str = ""
    tasks: str = ""  # tasks JSON
    classnames: str = ""  # zero-shot from files: the three together
    templates: str = ""
    labels: str = ""
    limit: int = 0
    batch_size: int = 64
    arithmetic_text: str = "caption"
    cache_dir: str = ""  # save each encoded set under <cache_dir>/<name>/<split>
    trust_checkpoint: bool = False  # accept a run / checkpoint directory (exporting it unpickles DeepSpeed state)
    device: str = "cpu"


def is_model(source: str) -> bool:
    """An exported .safetensors or an OpenCLIP / Hugging Face CLIP (alignclip.interop), not a cache of embeddings."""
    from alignclip.interop import foreign_kind

    return Path(source).suffix == ".safetensors" or foreign_kind(source) is not None


def resolve_source(source: str, options: SourceOptions, name: str = "", split: str | None = None) -> EmbeddingSet:
    """A cache directory / .npy (read), a model (an exported .safetensors, an OpenCLIP model or a Hugging Face CLIP
    folder: alignclip.interop), or a training run / checkpoint directory (exported first, into
    ``options.cache_dir`` or a temporary folder), encoded as ``options`` say."""
    o = options
    p = Path(source)
    if p.is_dir() and ((p / "checkpoints").is_dir() or (p / "mp_rank_00_model_states.pt").is_file()):
        if not o.trust_checkpoint:
            raise ValueError(f"{source} is a training run / checkpoint: reading it unpickles DeepSpeed state; export "
                             f"it with alignclip-export first, or pass --trust-checkpoint if you wrote it")
        p = _export_on_the_fly(p, o.cache_dir, name)  # a training run or checkpoint: export it first
    if p.suffix == ".safetensors" and not p.is_file():
        raise FileNotFoundError(f"{source}: no such exported model (.safetensors)")
    if not is_model(str(p)):
        return EmbeddingSet.load(p)
    extra = None
    if o.classnames or o.templates or o.labels:
        if not (o.classnames and o.templates and o.labels):
            raise ValueError("zero-shot from files needs all three of --classnames, --templates and --labels")
        extra = tasks_from_files(o.classnames, o.templates, o.labels, data=o.data)
    es = encode_with_model(p, o.data, split or o.split, o.folder, o.captions, o.tasks, o.limit, o.batch_size,
                           o.arithmetic_text, device=o.device, extra_tasks=extra)
    if o.cache_dir:
        from alignclip.interop import model_name

        es.save(Path(o.cache_dir) / (name or model_name(source)) / (split or o.split))
    return es


def _export_on_the_fly(checkpoint: Path, cache_dir: str, name: str) -> Path:
    import tempfile

    from alignclip.export import export_checkpoint

    folder = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="alignclip_export_"))
    return export_checkpoint(checkpoint, folder / f"{name or checkpoint.name}.safetensors")
