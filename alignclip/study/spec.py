"""The study file: which variants, which seeds, which data and budget, which evaluation sets.

    name: embedded                # the study folder is <output_dir>/<name>
    output_dir: runs/study
    executor: local               # local (one run after another) | slurm (one job array)
    seeds: [0, 1, 2]              # train.seed of each run; variants are paired by seed
    baseline: CLIP                # the variant every difference is taken against
    overrides: [key=value, ...]   # for every run: training data, budget, launch settings
    variants:
      - name: CLIP
        configs: [experiment/embedded_default, model/clip_tiny, loss/clip]   # stacked in order
        overrides: []
    eval_sets:
      - {name: generated-val, data: generated, split: val, probe_split: train}  # linear probes fit on train
      - {name: imagenet, data: /data/imagenet/val-{00000..00049}.tar, tasks: /data/imagenet/tasks.json}

Config files are names under configs/ or paths; later files override earlier ones (as a ``defaults:`` list).
Every key is checked when the file is read, and every run's config is resolved before anything is submitted,
so a typo exits with code 2 before a job starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import yaml

from alignclip.config import ConfigError, load_config, resolve_config_path
from alignclip.study.measure import EvalSet

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_TOP_KEYS = {"name", "output_dir", "executor", "seeds", "baseline", "overrides", "variants", "eval_sets"}
_VARIANT_KEYS = {"name", "configs", "overrides"}
_EVAL_KEYS = {"name", "data", "split", "tasks", "limit", "probe_split"}


@dataclass(frozen=True)
class Variant:
    name: str
    configs: tuple[Path, ...]
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class StudySpec:
    name: str
    output_dir: Path
    executor: str
    seeds: tuple[int, ...]
    baseline: str
    variants: tuple[Variant, ...]
    eval_sets: tuple[EvalSet, ...]
    overrides: tuple[str, ...] = ()
    source: str = ""

    @property
    def study_dir(self) -> Path:
        return (self.output_dir / self.name).absolute()

    def run_dir(self, variant: str, seed: int) -> Path:
        return self.study_dir / "runs" / variant / f"seed{seed}"

    def variant(self, name: str) -> Variant:
        return next(v for v in self.variants if v.name == name)


def _fail(source: str, message: str) -> ConfigError:
    return ConfigError(f"{source}: {message}")


def _strings(value, where: str, source: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(source, f"'{where}' must be a list of strings, got {value!r}")
    for item in value:
        if "=" not in item:
            raise _fail(source, f"'{where}' entry {item!r} is not of the form key=value")
    return tuple(value)


def _check_keys(found: dict, allowed: set[str], where: str, source: str) -> None:
    unknown = sorted(set(found) - allowed)
    if unknown:
        raise _fail(source, f"unknown key(s) {unknown} in {where}; expected some of {sorted(allowed)}")


def parse_study(raw: dict, source: str = "<study>", overrides: Sequence[str] = ()) -> StudySpec:
    """A StudySpec from the file's mapping (+ ``overrides`` appended to every run's), checked key by key."""
    if not isinstance(raw, dict):
        raise _fail(source, "a study file must be a mapping")
    _check_keys(raw, _TOP_KEYS, "the study", source)
    for key in ("name", "variants", "seeds"):
        if key not in raw:
            raise _fail(source, f"missing key '{key}'")
    name = str(raw["name"])
    if not _NAME.match(name):
        raise _fail(source, f"'name' {name!r} must be a folder name (letters, digits, . _ + -)")
    executor = raw.get("executor", "local")
    if executor not in ("local", "slurm"):
        raise _fail(source, f"'executor' must be 'local' or 'slurm', got {executor!r}")
    seeds = raw["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise _fail(source, f"'seeds' must be a non-empty list of distinct integers >= 0, got {seeds!r}")
    if not isinstance(raw["variants"], list) or not raw["variants"]:
        raise _fail(source, "'variants' must be a non-empty list")
    variants = []
    for i, item in enumerate(raw["variants"]):
        if not isinstance(item, dict):
            raise _fail(source, f"variants[{i}] must be a mapping with name, configs, overrides")
        _check_keys(item, _VARIANT_KEYS, f"variants[{i}]", source)
        vname = str(item.get("name", ""))
        if not _NAME.match(vname):
            raise _fail(source, f"variants[{i}].name {vname!r} must be a folder name (letters, digits, . _ + -)")
        configs = item.get("configs")
        if isinstance(configs, str):
            configs = [configs]
        if not configs or not all(isinstance(c, str) for c in configs):
            raise _fail(source, f"variants[{i}].configs must name at least one config file")
        try:
            paths = tuple(resolve_config_path(c).resolve() for c in configs)
        except ConfigError as err:
            raise _fail(source, f"variants[{i}].configs: {err}") from None
        variants.append(Variant(vname, paths, _strings(item.get("overrides"), f"variants[{i}].overrides", source)))
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise _fail(source, f"variant names must be distinct, got {names}")
    baseline = str(raw.get("baseline", names[0]))
    if baseline not in names:
        raise _fail(source, f"'baseline' {baseline!r} is not a variant (variants: {names})")
    eval_sets = []
    for i, item in enumerate(raw.get("eval_sets") or [{"name": "generated-val"}]):
        if not isinstance(item, dict) or "name" not in item:
            raise _fail(source, f"eval_sets[{i}] must be a mapping with at least a name")
        _check_keys(item, _EVAL_KEYS, f"eval_sets[{i}]", source)
        if item.get("split", "val") not in ("val", "train"):
            raise _fail(source, f"eval_sets[{i}].split must be 'val' or 'train', got {item['split']!r}")
        eval_set = EvalSet(str(item["name"]), str(item.get("data", "generated")), str(item.get("split", "val")),
                           str(item.get("tasks", "")), int(item.get("limit", 0)), str(item.get("probe_split") or ""))
        if eval_set.probe_split:
            # only the generated data knows its train split's labels; a probe never fits on the set it scores
            if eval_set.data != "generated" or eval_set.probe_split != "train" or eval_set.split == "train":
                raise _fail(source, f"eval_sets[{i}].probe_split: 'train' fits linear probes on the generated "
                                    f"train split and scores them on its val split (data: generated, split: val); "
                                    f"got probe_split {eval_set.probe_split!r} for data {eval_set.data!r}, split "
                                    f"{eval_set.split!r}")
        eval_sets.append(eval_set)
    if len({e.name for e in eval_sets}) != len(eval_sets):
        raise _fail(source, "eval_sets names must be distinct")
    spec = StudySpec(name, Path(str(raw.get("output_dir", "runs/study"))), executor, tuple(seeds), baseline,
                     tuple(variants), tuple(eval_sets),
                     _strings(raw.get("overrides"), "overrides", source) + tuple(overrides), source)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="alignclip_study_") as scratch:
        for variant in spec.variants:  # every run's config resolves now, or the study does not start
            try:
                load_config(write_variant_config(spec, variant, Path(scratch)), run_overrides(spec, variant, 0))
            except ConfigError as err:
                raise _fail(source, f"variant {variant.name}: {err}") from None
    return spec


def load_study(path: str | Path, overrides: Sequence[str] = ()) -> StudySpec:
    p = resolve_config_path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML ({err})") from None
    return parse_study(raw, str(p), overrides)


def run_overrides(spec: StudySpec, variant: Variant, seed: int) -> list[str]:
    """Study overrides, then the variant's, then the seed and the run's name (the variant's)."""
    return [*spec.overrides, *variant.overrides, f"train.seed={seed}", f"name={variant.name}"]


def write_variant_config(spec: StudySpec, variant: Variant, folder: Path | None = None) -> Path:
    """The variant's stacked config files as one experiment file (``defaults:`` in order) in ``folder``
    (default: the study's configs/), so every run of it is an ordinary ``alignclip.train`` run."""
    text = ("# written by alignclip-study: the variant's config files, later ones overriding earlier ones\n"
            + yaml.safe_dump({"defaults": [str(p) for p in variant.configs]}))
    folder = folder if folder is not None else spec.study_dir / "configs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{variant.name}.yaml"
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    return path
