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

Besides a pretraining recipe (``configs``), a variant may be derived from another variant's run of the same seed:

      - name: CLIP+IMSep            # (b) a fine-tune: start from CLIP's final weights (model.init_from), train
        finetune: {from: CLIP, steps: 64}          # `steps` more steps with this variant's own configs/overrides
        configs: [experiment/embedded_clip]
        overrides: [loss.clip_weight=0, loss.crsep_weight=1, loss.imsep_weight=0.5]
      - name: CLIP+procrustes       # (c) a post-hoc map fitted on CLIP's embeddings of a fit set, then scored on
        posthoc: {from: CLIP, map: procrustes, fit: generated-train}   # every evaluation set (no training)

    fit_sets:                       # sets post-hoc maps fit on (the eval_sets' keys; never an evaluation set)
      - {name: generated-train, data: generated, split: train, limit: 2048}
    sweeps:                         # one variant per value (or value pair), measured like any other variant
      - {name: imsep_weight, variant: AlignCLIP-step0, keys: [loss.imsep_weight], values: [0.0, 0.25, 0.5, 1.0]}

A sweep point is the variant ``<sweep name>-<value>[-<value>]`` with ``key=value`` appended to its base variant's
overrides; the point whose values equal the base variant's own resolved values is the base variant itself (its
runs are not repeated). Post-hoc maps: ``mean_shift``, ``mean_centering``, ``procrustes`` (alignclip.aligner.baselines)
and ``mlp`` (the distilled aligner, alignclip.aligner.train, seeded by the run's seed).

Evaluation sets take the same ground-truth files as ``alignclip-eval`` / ``alignclip-gap``: a tasks JSON, or
``classnames`` + ``templates`` + ``labels`` files (labels keyed by the shards' keys or by the source file names that
``alignclip-make-shards folder`` recorded).

Config files are names under configs/ or paths; later files override earlier ones (as a ``defaults:`` list).
Every key is checked when the file is read, and every run's config is resolved before anything is submitted,
so a typo exits with code 2 before a job starts.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import yaml

from alignclip.config import ConfigError, ModelConfig, load_config, resolve_config_path
from alignclip.study.measure import EvalSet

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_TOP_KEYS = {"name", "output_dir", "executor", "seeds", "baseline", "overrides", "variants", "eval_sets", "fit_sets",
             "sweeps", "tradeoff", "plan"}
_VARIANT_KEYS = {"name", "configs", "overrides", "finetune", "posthoc"}
_FINETUNE_KEYS = {"from", "steps"}
_POSTHOC_KEYS = {"from", "map", "fit"}
_SWEEP_KEYS = {"name", "variant", "keys", "values", "trend", "extrapolate"}
_EVAL_KEYS = {"name", "data", "split", "tasks", "limit", "probe_split", "classnames", "templates", "labels"}
_TRADEOFF_KEYS = {"gap", "downstream"}
_PLAN_KEYS = {"mfu", "nodes", "gpus_per_node", "peak_tflops", "gpu", "samples"}
POSTHOC_MAPS = ("mean_shift", "mean_centering", "procrustes", "mlp")


@dataclass(frozen=True)
class FineTune:
    source: str  # the variant whose final checkpoint of the same seed this one starts from
    steps: int


@dataclass(frozen=True)
class PostHoc:
    source: str  # the variant whose embeddings the map is fitted on and applied to
    map: str  # one of POSTHOC_MAPS
    fit: str  # a fit set's name


@dataclass(frozen=True)
class Variant:
    name: str
    configs: tuple[Path, ...] = ()
    overrides: tuple[str, ...] = ()
    finetune: FineTune | None = None
    posthoc: PostHoc | None = None

    @property
    def kind(self) -> str:
        return "posthoc" if self.posthoc else "finetune" if self.finetune else "pretrain"

    @property
    def source(self) -> str:
        return self.posthoc.source if self.posthoc else self.finetune.source if self.finetune else ""

    @property
    def trains(self) -> bool:
        return self.posthoc is None


@dataclass(frozen=True)
class SweepPoint:
    values: tuple  # one value per key
    variant: str  # the variant measured at this point (the base variant itself where the values are its own)


@dataclass(frozen=True)
class Sweep:
    name: str
    base: str
    keys: tuple[str, ...]
    points: tuple[SweepPoint, ...]
    trend: bool = False  # fit metric = a + b log10(x) per method (a data-fraction / steps axis)
    extrapolate: float | None = None  # with trend: the fit's prediction (and its interval) at this x

    def label(self, point: SweepPoint) -> str:
        return ", ".join(_format(v) for v in point.values)


@dataclass(frozen=True)
class Tradeoff:
    gap: str = "gap/alignment_score"
    downstream: tuple[str, ...] = ()  # metric ids; empty: I->T R@1 and each zero-shot task's per-class recall


@dataclass(frozen=True)
class PlanSettings:
    """What the cost plan assumes: the model FLOPs utilisation, the nodes per run and the GPU's dense peak."""

    mfu: float = 0.35
    nodes: int = 1
    gpus_per_node: int = 8
    gpu: str = "H100 SXM"
    peak_tflops: float = 989.4  # H100 SXM dense bf16
    samples: int = 0  # samples per epoch; 0: data.samples_per_epoch, else counted from the shards


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
    fit_sets: tuple[EvalSet, ...] = ()
    sweeps: tuple[Sweep, ...] = ()
    tradeoff: Tradeoff = field(default_factory=Tradeoff)
    plan: PlanSettings = field(default_factory=PlanSettings)

    @property
    def study_dir(self) -> Path:
        return (self.output_dir / self.name).absolute()

    def run_dir(self, variant: str, seed: int) -> Path:
        return self.study_dir / "runs" / variant / f"seed{seed}"

    def variant(self, name: str) -> Variant:
        return next(v for v in self.variants if v.name == name)

    def fit_set(self, name: str) -> EvalSet:
        return next(f for f in self.fit_sets if f.name == name)


def _fail(source: str, message: str) -> ConfigError:
    return ConfigError(f"{source}: {message}")


def _format(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


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


def _mapping(value, where: str, source: str, allowed: set[str], required: Sequence[str]) -> dict:
    if not isinstance(value, dict):
        raise _fail(source, f"'{where}' must be a mapping with {', '.join(required)}, got {value!r}")
    _check_keys(value, allowed, where, source)
    missing = [k for k in required if k not in value]
    if missing:
        raise _fail(source, f"'{where}' is missing {missing}")
    return value


def _config_paths(configs, where: str, source: str) -> tuple[Path, ...]:
    if isinstance(configs, str):
        configs = [configs]
    if not configs or not isinstance(configs, list) or not all(isinstance(c, str) for c in configs):
        raise _fail(source, f"{where} must name at least one config file")
    try:
        return tuple(resolve_config_path(c).resolve() for c in configs)
    except ConfigError as err:
        raise _fail(source, f"{where}: {err}") from None


def _variant(item, i: int, source: str) -> Variant:
    if not isinstance(item, dict):
        raise _fail(source, f"variants[{i}] must be a mapping with name, configs, overrides")
    _check_keys(item, _VARIANT_KEYS, f"variants[{i}]", source)
    vname = str(item.get("name", ""))
    if not _NAME.match(vname):
        raise _fail(source, f"variants[{i}].name {vname!r} must be a folder name (letters, digits, . _ + -)")
    where = f"variants[{i}]"
    if "posthoc" in item:
        if "finetune" in item or "configs" in item or "overrides" in item:
            raise _fail(source, f"{where}.posthoc: a post-hoc map trains nothing; drop configs/overrides/finetune")
        raw = _mapping(item["posthoc"], f"{where}.posthoc", source, _POSTHOC_KEYS, ("from", "map", "fit"))
        if raw["map"] not in POSTHOC_MAPS:
            raise _fail(source, f"{where}.posthoc.map must be one of {list(POSTHOC_MAPS)}, got {raw['map']!r}")
        return Variant(vname, posthoc=PostHoc(str(raw["from"]), str(raw["map"]), str(raw["fit"])))
    configs = _config_paths(item.get("configs"), f"{where}.configs", source)
    finetune = None
    if "finetune" in item:
        raw = _mapping(item["finetune"], f"{where}.finetune", source, _FINETUNE_KEYS, ("from", "steps"))
        if not isinstance(raw["steps"], int) or isinstance(raw["steps"], bool) or raw["steps"] < 1:
            raise _fail(source, f"{where}.finetune.steps must be an integer >= 1, got {raw['steps']!r}")
        finetune = FineTune(str(raw["from"]), raw["steps"])
    return Variant(vname, configs, _strings(item.get("overrides"), f"{where}.overrides", source), finetune)


def _eval_set(item, where: str, source: str) -> EvalSet:
    if not isinstance(item, dict) or "name" not in item:
        raise _fail(source, f"{where} must be a mapping with at least a name")
    _check_keys(item, _EVAL_KEYS, where, source)
    if not _NAME.match(str(item["name"])):
        raise _fail(source, f"{where}.name {item['name']!r} must be a folder name (letters, digits, . _ + -)")
    if item.get("split", "val") not in ("val", "train"):
        raise _fail(source, f"{where}.split must be 'val' or 'train', got {item['split']!r}")
    files = [k for k in ("classnames", "templates", "labels") if item.get(k)]
    if files and len(files) != 3:
        raise _fail(source, f"{where}: zero-shot from files needs all three of classnames, templates and labels "
                            f"(got {files})")
    if files and item.get("tasks"):
        raise _fail(source, f"{where}: give either a tasks JSON or classnames/templates/labels files, not both")
    return EvalSet(str(item["name"]), str(item.get("data", "generated")), str(item.get("split", "val")),
                   str(item.get("tasks", "")), int(item.get("limit", 0)), str(item.get("probe_split") or ""),
                   *(str(Path(str(item[k])).expanduser().resolve()) if item.get(k) else ""
                     for k in ("classnames", "templates", "labels")))


def _sweep(item, i: int, variants: dict[str, Variant], spec_for_values, source: str) -> tuple[Sweep, list[Variant]]:
    where = f"sweeps[{i}]"
    raw = _mapping(item, where, source, _SWEEP_KEYS, ("name", "variant", "keys", "values"))
    name, base = str(raw["name"]), str(raw["variant"])
    if not _NAME.match(name):
        raise _fail(source, f"{where}.name {name!r} must be a folder name (letters, digits, . _ + -)")
    if base not in variants or not variants[base].trains:
        raise _fail(source, f"{where}.variant {base!r} is not a trained variant (variants: "
                            f"{[v for v, x in variants.items() if x.trains]})")
    keys = raw["keys"] if isinstance(raw["keys"], list) else [raw["keys"]]
    if not keys or len(keys) > 2 or not all(isinstance(k, str) and k for k in keys):
        raise _fail(source, f"{where}.keys must name one or two config keys, got {raw['keys']!r}")
    values = raw["values"]
    if not isinstance(values, list) or len(values) < 2:
        raise _fail(source, f"{where}.values must list at least two values, got {values!r}")
    rows = [tuple(v) if isinstance(v, list) else (v,) for v in values]
    if any(len(r) != len(keys) for r in rows):
        raise _fail(source, f"{where}.values: each value must give {len(keys)} value(s) (one per key in {keys})")
    if len(set(rows)) != len(rows):
        raise _fail(source, f"{where}.values must be distinct, got {values!r}")
    own = spec_for_values(variants[base], keys)
    points, new = [], []
    for row in rows:
        if all(_same(a, b) for a, b in zip(row, own)):
            points.append(SweepPoint(row, base))
            continue
        vname = f"{name}-" + "-".join(_format(v) for v in row)
        if not _NAME.match(vname):
            raise _fail(source, f"{where}: value(s) {row} do not make a folder name ({vname!r})")
        extra = tuple(f"{k}={_format(v)}" for k, v in zip(keys, row))
        new.append(replace(variants[base], name=vname, overrides=variants[base].overrides + extra))
        points.append(SweepPoint(row, vname))
    extrapolate = raw.get("extrapolate")
    if extrapolate is not None and (not raw.get("trend") or not isinstance(extrapolate, (int, float))
                                    or extrapolate <= 0):
        raise _fail(source, f"{where}.extrapolate must be a number > 0 and needs trend: true, got {extrapolate!r}")
    return Sweep(name, base, tuple(keys), tuple(points), bool(raw.get("trend", False)),
                 float(extrapolate) if extrapolate is not None else None), new


def _same(a, b) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return _format(a) == _format(b)


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
    variants = [_variant(item, i, source) for i, item in enumerate(raw["variants"])]
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise _fail(source, f"variant names must be distinct, got {names}")
    eval_sets = []
    for i, item in enumerate(raw.get("eval_sets") or [{"name": "generated-val"}]):
        eval_set = _eval_set(item, f"eval_sets[{i}]", source)
        if eval_set.probe_split:
            # only the generated data knows its train split's labels; a probe never fits on the set it scores
            if eval_set.data != "generated" or eval_set.probe_split != "train" or eval_set.split == "train":
                raise _fail(source, f"eval_sets[{i}].probe_split: 'train' fits linear probes on the generated "
                                    f"train split and scores them on its val split (data: generated, split: val); "
                                    f"got probe_split {eval_set.probe_split!r} for data {eval_set.data!r}, split "
                                    f"{eval_set.split!r}")
        eval_sets.append(eval_set)
    fit_sets = [_eval_set(item, f"fit_sets[{i}]", source) for i, item in enumerate(raw.get("fit_sets") or [])]
    set_names = [e.name for e in eval_sets + fit_sets]
    if len(set(set_names)) != len(set_names):
        raise _fail(source, f"eval_sets and fit_sets names must be distinct, got {set_names}")
    by_name = {v.name: v for v in variants}
    for i, v in enumerate(variants):
        if not v.source:
            continue
        where = f"variants[{i}].{v.kind}.from"
        if v.source not in by_name or by_name[v.source].kind != "pretrain":
            raise _fail(source, f"{where} {v.source!r} must name a pretraining variant (one with configs and no "
                                f"finetune/posthoc), one of {[n for n, x in by_name.items() if x.kind == 'pretrain']}")
        if v.posthoc and v.posthoc.fit not in {f.name for f in fit_sets}:
            raise _fail(source, f"variants[{i}].posthoc.fit {v.posthoc.fit!r} is not a fit set (fit_sets: "
                                f"{[f.name for f in fit_sets]})")
    baseline = str(raw.get("baseline", names[0]))
    if baseline not in names:
        raise _fail(source, f"'baseline' {baseline!r} is not a variant (variants: {names})")
    tradeoff = Tradeoff()
    if raw.get("tradeoff") is not None:
        t = _mapping(raw["tradeoff"], "tradeoff", source, _TRADEOFF_KEYS, ())
        down = t.get("downstream", [])
        tradeoff = Tradeoff(str(t.get("gap", tradeoff.gap)), tuple(down if isinstance(down, list) else [down]))
    plan = PlanSettings()
    if raw.get("plan") is not None:
        p = _mapping(raw["plan"], "plan", source, _PLAN_KEYS, ())
        plan = replace(plan, **p)
        if not 0 < plan.mfu <= 1 or plan.nodes < 1 or plan.gpus_per_node < 1 or plan.peak_tflops <= 0:
            raise _fail(source, f"plan: mfu must lie in (0, 1], nodes and gpus_per_node >= 1, peak_tflops > 0; "
                                f"got {p}")
    spec = StudySpec(name, Path(str(raw.get("output_dir", "runs/study"))), executor, tuple(seeds), baseline,
                     tuple(variants), tuple(eval_sets),
                     _strings(raw.get("overrides"), "overrides", source) + tuple(overrides), source,
                     tuple(fit_sets), (), tradeoff, plan)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="alignclip_study_") as scratch:
        configs: dict[str, object] = {}

        def resolved(variant: Variant):
            if variant.name not in configs:
                try:
                    configs[variant.name] = load_config(write_variant_config(spec, variant, Path(scratch)),
                                                        run_overrides(spec, variant, 0))
                except ConfigError as err:
                    raise _fail(source, f"variant {variant.name}: {err}") from None
            return configs[variant.name]

        def own_values(variant: Variant, keys: Sequence[str]) -> tuple:
            try:
                return tuple(functools.reduce(getattr, k.split("."), resolved(variant)) for k in keys)
            except AttributeError as err:
                raise _fail(source, f"sweep over {list(keys)} of {variant.name}: no such config key ({err})") from None

        sweeps = []
        for i, item in enumerate(raw.get("sweeps") or []):
            sweep, extra = _sweep(item, i, {v.name: v for v in variants}, own_values, source)
            taken = {v.name for v in variants}
            clash = [v.name for v in extra if v.name in taken]
            if clash:
                raise _fail(source, f"sweeps[{i}]: point variant(s) {clash} clash with existing variant names")
            variants += extra
            sweeps.append(sweep)
        spec = replace(spec, variants=tuple(variants), sweeps=tuple(sweeps))
        if any(v.finetune for v in spec.variants) and not hasattr(ModelConfig(), "init_from"):
            raise _fail(source, "fine-tune variants start from model.init_from, which this version's config "
                                "does not have")
        for variant in spec.variants:  # every run's config resolves now, or the study does not start
            if variant.trains:
                resolved(variant)
    return spec


def load_study(path: str | Path, overrides: Sequence[str] = ()) -> StudySpec:
    from alignclip.config import check_repeated_overrides

    check_repeated_overrides(list(overrides))
    p = resolve_config_path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML ({err})") from None
    return parse_study(raw, str(p), overrides)


def run_overrides(spec: StudySpec, variant: Variant, seed: int, start: str = "") -> list[str]:
    """Study overrides, then the variant's, then the seed and the run's name (the variant's); a fine-tune starts
    from ``start``, its source variant's final checkpoint of the same seed (``model.init_from``; the runner exports
    it), and trains ``finetune.steps`` steps (an empty ``start``: a placeholder path, for checking the keys)."""
    out = [*spec.overrides, *variant.overrides, f"train.seed={seed}", f"name={variant.name}"]
    if variant.finetune is not None:
        out += [f"model.init_from={start}", f"train.max_steps={variant.finetune.steps}"]
    return last_wins(out)


def last_wins(overrides: Sequence[str]) -> list[str]:
    """Each key once, at its last value: the layers (study file, command line, variant, run) override each other on
    purpose, and the trainer refuses a key given twice (the guard against a shell-expanded brace pattern, which
    ``load_study`` applies to the command line's own overrides)."""
    from alignclip.config import override_key

    last = {override_key(item): i for i, item in enumerate(overrides)}
    return [item for i, item in enumerate(overrides) if last[override_key(item)] == i]


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
