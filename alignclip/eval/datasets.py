"""Standard evaluation datasets on disk, read the way CLIP_benchmark reads them.

    imagefolder  ROOT/<class>/<image>  (torchvision ImageFolder; ImageNet's val layout with wnid folders gets the
                 1,000 ImageNet class names, other folders their own names with '_' as ' ')
    cifar10 / cifar100  ROOT/cifar-10-batches-py or ROOT/cifar-100-python: torchvision's pickled batches
                 (torchvision.datasets.CIFAR10/100, download=False); split test or train
    karpathy     a Karpathy-split JSON (dataset_flickr30k.json, dataset_coco.json) and ROOT, the image folder:
                 images of the chosen split with all their captions (COCO's 'filepath' subfolders honoured)
    wds          CLIP_benchmark's webdataset layout: ROOT/<split>/nshards.txt + 0.tar ...; ROOT/dataset_type.txt
                 ('retrieval' or classification), ROOT/classnames.txt, ROOT/zeroshot_classification_templates.txt

Classification data yields (image, class index) and carries class names and prompt templates; retrieval data
yields (image, [captions]). An image that does not decode (corrupt, truncated, over the pixel limit) comes as an
``Unreadable`` in the image's place, so that the evaluation counts and skips it as training does (CLIP_benchmark
would stop at it); a missing file still raises. Class names and the OpenAI templates for ImageNet-1k and
CIFAR-10/100 ship with the package (``alignclip/eval/data``; the tables of CLIP_benchmark / OpenAI CLIP).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

from torch.utils.data import Dataset, IterableDataset

from alignclip.data.images import DecodeError, load_rgb

KINDS = ("imagefolder", "cifar10", "cifar100", "karpathy", "wds")
_DATA_DIR = Path(__file__).parent / "data"
_WNID = re.compile(r"n\d{8}")


@functools.lru_cache(maxsize=None)
def shipped(table: str) -> dict[str, list[str]]:
    """``classnames`` or ``templates``: dataset name -> list, from the package data."""
    return json.loads((_DATA_DIR / f"{table}.json").read_text())


class Unreadable(NamedTuple):
    """Stands in for the image of a sample that does not decode: which file or shard member, and why."""
    source: str
    reason: str


def decoded(source, transform: Callable | None = None, name: str = ""):
    """The image at ``source`` (a path, or bytes with their ``name``) through ``transform``, or an ``Unreadable``
    naming it."""
    try:
        img = load_rgb(source)
    except DecodeError as err:
        return Unreadable(name or str(source), str(err))
    return transform(img) if transform else img


@dataclass
class ClassificationData:
    dataset: Dataset | IterableDataset  # (image, class index)
    classnames: list[str]
    templates: list[str]


@dataclass
class RetrievalData:
    dataset: Dataset | IterableDataset  # (image, list of captions)


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: expected {what}")
    return path


class KarpathyCaptions(Dataset):
    """(image, [captions]) of one split of a Karpathy-split JSON ({"images": [{filename, [filepath], split,
    sentences: [{raw}]}]}); 'restval' counts as train."""

    def __init__(self, annotations: str | Path, image_root: str | Path, split: str, transform: Callable | None):
        data = json.loads(_need(Path(annotations), "a Karpathy-split JSON (dataset_flickr30k.json or "
                                                   "dataset_coco.json)").read_text())
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise ValueError(f"{annotations}: expected a Karpathy-split JSON with an 'images' list")
        wanted = {"train", "restval"} if split == "train" else {split}
        self.items = [(Path(image_root) / img.get("filepath", "") / img["filename"],
                       [s["raw"].strip() for s in img["sentences"]])
                      for img in data["images"] if img.get("split") in wanted]
        if not self.items:
            raise ValueError(f"{annotations}: no image with split {split!r}")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, captions = self.items[i]
        return decoded(path, self.transform), captions


def _imagefolder(root: Path, transform) -> ClassificationData:
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(str(_need(root, "an ImageFolder root: one sub-folder of images per class")),
                     loader=functools.partial(decoded, transform=transform))
    if len(ds.classes) == 1000 and all(_WNID.fullmatch(c) for c in ds.classes):  # ImageNet val, sorted wnids
        return ClassificationData(ds, shipped("classnames")["imagenet1k"], shipped("templates")["imagenet1k"])
    return ClassificationData(ds, [c.replace("_", " ") for c in ds.classes], shipped("templates")["imagenet1k"])


def _without_checksums(cls):
    """torchvision's CIFAR class reading the same files without its whole-file MD5 checks (so re-packed or subset
    copies in the same format load; a damaged file still fails to unpickle). The batches are pickles: read only
    CIFAR copies you trust."""
    def strip(entries):
        return [[name, None] for name, _ in entries]

    return type(cls.__name__, (cls,), {"train_list": strip(cls.train_list), "test_list": strip(cls.test_list),
                                       "meta": dict(cls.meta, md5=None)})


def _cifar(kind: str, root: Path, split: str, transform) -> ClassificationData:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = _without_checksums(CIFAR10 if kind == "cifar10" else CIFAR100)
    folder = root / cls.base_folder
    _need(folder, f"torchvision's {kind} folder {cls.base_folder}/ (its pickled batches) under {root}")
    try:
        ds = cls(str(root), train=split == "train", download=False, transform=transform)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
        raise ValueError(f"{folder}: {err} (expected torchvision's pickled {kind} batches)") from None
    return ClassificationData(ds, [c.replace("_", " ") for c in ds.classes], shipped("templates")[kind])


def _wds(root: Path, split: str, transform):
    import webdataset as wds

    nshards = int(_need(root / split / "nshards.txt", "CLIP_benchmark's webdataset layout "
                                                      "(ROOT/SPLIT/nshards.txt and 0.tar ...)").read_text())
    kind = (root / "dataset_type.txt").read_text().strip().lower() if (root / "dataset_type.txt").is_file() \
        else "classification"
    pattern = str(root / split / f"{{0..{nshards - 1}}}.tar")
    stream = wds.WebDataset(pattern, shardshuffle=False, nodesplitter=wds.split_by_node, empty_check=False)

    def image(sample):
        for ext in ("webp", "png", "jpg", "jpeg"):
            if ext in sample:
                return decoded(sample[ext], transform, f"{sample.get('__url__')}: {sample.get('__key__')}.{ext}")
        raise ValueError(f"{sample.get('__url__')}: sample {sample.get('__key__')} has no webp/png/jpg image")

    if kind == "retrieval":
        return RetrievalData(stream.map(lambda s: (image(s), s["txt"].decode("utf-8").splitlines())))
    classnames = _lines(_need(root / "classnames.txt", "classnames.txt (one class name a line)"))
    templates_file = root / "zeroshot_classification_templates.txt"
    templates = _lines(templates_file) if templates_file.is_file() else shipped("templates")["imagenet1k"]
    return ClassificationData(stream.map(lambda s: (image(s), int(s["cls"]))), classnames, templates)


def open_benchmark(kind: str, root: str | Path, split: str = "test", transform: Callable | None = None,
                   annotations: str | Path = "") -> ClassificationData | RetrievalData:
    """One of KINDS at ``root`` (split ``test``, ``val`` or ``train``), images through ``transform``."""
    root = Path(root)
    if kind == "imagefolder":
        return _imagefolder(root, transform)
    if kind in ("cifar10", "cifar100"):
        return _cifar(kind, root, split, transform)
    if kind == "karpathy":
        if not annotations:
            raise ValueError("a karpathy dataset needs its JSON (--annotations dataset_flickr30k.json)")
        return RetrievalData(KarpathyCaptions(annotations, root, split, transform))
    if kind == "wds":
        return _wds(root, split, transform)
    raise ValueError(f"unknown dataset kind {kind!r}; expected one of {list(KINDS)}")
