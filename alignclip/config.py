"""Typed configuration: dataclass schema <- YAML file(s) <- ``key=value`` overrides.

The schema below is the single source of defaults. ``load_config`` merges a YAML file (which may name
``defaults:`` files to inherit from, relative to itself) and a dotlist of overrides on top of it, in OmegaConf
struct mode, so an unknown key or a value of the wrong type fails *before* anything is built, with a
``ConfigError`` that names the key and the file. ``python -m alignclip.config`` prints a resolved config and
exits with code 2 on such an error (``alignclip.errors.run_command``).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from alignclip.braces import brace_pattern_of
from alignclip.compat.config import MOVED_KEYS, move_old_keys, upgrade_saved_config, warn_moved_keys
from alignclip.errors import ConfigError, run_command
from alignclip.fs import atomic_write
from alignclip.paths import CONFIG_DIR  # noqa: F401  (re-exported: names resolve under it)


# --------------------------------------------------------------------------------------------- model
@dataclass
class VisionConfig:
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    # patch: CLIP's one patch_size x patch_size conv. hybrid: the ResNet-v2 root of the hybrid ViT (Dosovitskiy
    # et al. 2021, arXiv:2010.11929, section 3.1: a 7x7 stride-2 conv, GroupNorm, ReLU, max pool) and a
    # (patch_size / 4)-px patch conv; patch_size a multiple of 4. conv: 3x3 stride-2 convolutions down to the same
    # grid (Xiao et al. 2021, arXiv:2106.14881); patch_size a power of two. A tiny ViT needs either convolutional
    # stem to learn shapes within a few hundred steps (docs/study.md). All three export to OpenCLIP's and Hugging
    # Face's layouts but conv to OpenCLIP's (alignclip.models.stems).
    stem: str = "patch"
    stem_channels: int = 0  # conv stem: channels of its last 3x3 conv (halving towards the image); 0 = width


@dataclass
class TextConfig:
    context_length: int = 77
    vocab_size: int = 49408  # CLIP BPE: 256 bytes x 2 + 48,894 merges + <start>, <end>
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0


@dataclass
class ModelConfig:
    # clip: two towers, each with its own projection. sharedclip: one block stack, final norm and projection.
    arch: str = "clip"
    embed_dim: int = 768
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    init_temperature: float = 0.07  # logit_scale starts at ln(1 / 0.07)
    max_logit_scale: float = math.log(100.0)  # clamp s = exp(logit_scale) <= 100, as CLIP
    grad_checkpointing: bool = False
    # Run each trunk's last block at the pooled position only (the one row the embedding reads): the same values
    # and gradients, ~1/layers of the linear work less (alignclip.models.layers.pooled_block; training.flops counts it)
    pooled_last_block: bool = True
    # eps of every LayerNorm (stem, blocks, final), one value as in OpenCLIP and HF CLIP so exports are exact.
    # null = checkpoints saved before this key: 1e-6 in the blocks, 1e-5 elsewhere (from_yaml_text sets it).
    norm_eps: Optional[float] = 1e-5
    # MLP activation: exact GELU, or QuickGELU x * sigmoid(1.702 x) (OpenAI's CLIP and OpenCLIP's -quickgelu
    # models; exported as quick_gelu / hidden_act quick_gelu)
    act: str = "gelu"
    # Start from another model's weights (alignclip.interop): our export or run directory, an OpenCLIP folder
    # ('local-dir:' / 'hf-hub:' from the cache / 'ARCH:TAG' cached weights) or a Hugging Face CLIP folder. The
    # shape keys above must match it (the error lists the overrides); a resumed checkpoint takes precedence.
    init_from: Optional[str] = None


# ---------------------------------------------------------------------------------------------- loss
@dataclass
class LossConfig:
    """Weights of each loss term (docs/losses.md); a zero weight switches a term off. AlignCLIP = Eslami & de Melo,
    "Mitigate the Gap: Investigating Approaches for Improving Cross-Modal
    Alignment in CLIP", ICLR 2025, arXiv:2406.17639.

    clip:      L_clip = 1/2 [CE(sP, y) + CE(sP^T, y)]                  (AlignCLIP eq. 4; Radford et al. 2021)
    crsep:     L_CRsep = CE(sP, y) + CE(sP^T, y), a sum                  (eq. 12, AlignCLIP's alpha)
    imsep:     L_IMsep = CE(s [diag(P) + X X^T (1 - S)], y)              (eq. 7-11, AlignCLIP's beta)
    uniform / xuniform / align: the contrastive-gap terms               (Fahim, Murphy & Fyshe 2024,
                                                                         arXiv:2405.18570, eq. 2-5)
    """

    impl: str = "auto"  # dense | chunked | triton | auto
    clip_weight: float = 1.0
    crsep_weight: float = 0.0
    imsep_weight: float = 0.0
    imsep_sides: str = "image"  # image | text | both (both = sum of the two, appendix A.2)
    imsep_rescale: bool = True  # False: D = 1 (Table 7 ablation)
    # An onset for IMSep (not in the paper, whose recipe is 0 and 0): its weight is 0 before optimizer step
    # imsep_start_step, then rises linearly to imsep_weight over imsep_ramp_steps steps (0: at once). At the
    # embedded scale IMSep from the first step keeps the hard attribute (shape) from ever being learnt, while
    # switched on once it is, it closes the gap and keeps it (docs/study.md). No effect while imsep_weight is 0.
    imsep_start_step: int = 0
    imsep_ramp_steps: int = 0
    uniform_weight: float = 0.0
    xuniform_weight: float = 0.0
    align_weight: float = 0.0
    chunk_size: int = 1024  # tile edge of the chunked implementation
    # Sentence encoder that produces E_s (name or local path); used online when a shard has no embedding.
    semantic_model: str = "sentence-transformers/all-mpnet-base-v2"
    semantic_batch_size: int = 256


# ---------------------------------------------------------------------------------------------- data
@dataclass
class GeneratedDataConfig:
    """The procedurally rendered dataset that the embedded default and the tests train on."""

    num_shards: int = 8
    samples_per_shard: int = 512
    image_size: int = 64
    val_samples: int = 256
    seed: int = 0
    # Generator version: 1 = one or two objects, the caption names everything drawn; 2 = up to max_objects
    # objects on a patterned background, each caption names only part of the scene (alignclip.data.generated);
    # 3 = v2 whose captions always name an object's shape and its colour only sometimes (colour_coverage).
    version: int = 1
    caption_coverage: float = 0.5  # v2: chance that each optional fact (other object, size, background) is named
    captions_per_image: int = 2  # v2: distinct captions per training image (one sample each)
    max_objects: int = 2  # v2: objects per scene, 1..max_objects
    # v3 (= v2's scenes): every named object by its shape, the noun, as real captions name objects; its colour word
    # only with this chance (colour, learnt at once, would otherwise starve the shape words: docs/study.md)
    colour_coverage: float = 0.25


@dataclass
class DataConfig:
    # Shard specs: a brace pattern or several joined with '::' (e.g. "a/{00000..00099}.tar::b/{0..9}.tar").
    # A path ending in '/' or naming a folder takes its *.tar files. "generated" means the built-in dataset.
    train: str = ""
    val: str = ""
    resampled: bool = False  # sample shards with replacement (infinite stream); needs samples_per_epoch
    # One upsampling factor per '::' source of train, e.g. "1::0.5" (OpenCLIP's --train-data-upsampling-factors);
    # needs resampled=true. "" = every shard equally likely
    weights: str = ""
    samples_per_epoch: int = 0  # 0: counted from the shards (sizes in their json or by reading them)
    workers: int = 2
    shuffle_buffer: int = 1000  # sample-level shuffle inside each worker; larger = better mixing, more memory
    # Batches each worker keeps ready (DataLoader prefetch_factor): workers x prefetch batches absorb decode
    # jitter; throughput itself comes from enough workers (docs/performance.md sizes both).
    prefetch_factor: int = 4
    # Page-locked host batches, so host-to-device copies are asynchronous (non_blocking) and overlap the step.
    # null = on when training on CUDA (pinning costs a copy and locked memory and buys nothing on CPU).
    pin_memory: Optional[bool] = None
    image_key: str = "jpg;png;jpeg;webp"
    text_key: str = "txt"
    semantic_key: str = "sem.npy"  # precomputed sentence embedding, when the shard has one
    semantic_dir: str = ""  # sidecar folder of per-shard embeddings, when not stored in the shards
    # Remote (http(s)://, s3://...) and pipe: shards: seconds without a byte before a read counts as stalled, and
    # re-opens of a shard that fails before its first sample; then it is counted and skipped
    io_timeout_s: float = 60.0
    io_retries: int = 2
    # Seconds the trainer waits for one batch from the loader's workers before it saves and exits 124 (a stalled
    # data source); 0 = no limit. Needs data.workers > 0 (DataLoader's timeout)
    loader_timeout_s: float = 0.0
    # Images with more pixels are skipped (counted as too_large_image, named in the log); 0 = no limit of ours
    max_image_pixels: int = 100_000_000
    # Where training JPEGs are decoded, cropped and resized: cpu (the loader workers) or gpu (the trainer's device,
    # nvJPEG: workers only read, check and tokenise; other formats still decode in the workers). docs/data.md
    decode: str = "cpu"
    cache_dir: str = ""  # where generated shards go; "" = $ALIGNCLIP_CACHE/generated (~/.cache/alignclip/generated)
    generated: GeneratedDataConfig = field(default_factory=GeneratedDataConfig)


# --------------------------------------------------------------------------------------------- train
@dataclass
class TrainConfig:
    """How long, on what batch, on which device, and what a non-finite step does."""

    seed: int = 0
    epochs: int = 30
    max_steps: int = 0  # > 0 stops early (tests, smoke runs); 0 = epochs x steps per epoch
    global_batch_size: int = 512
    micro_batch_size: int = 0  # per device; 0 = global / world size (no gradient accumulation)
    device: str = "auto"  # auto | cuda | cpu
    # stop | skip: what a non-finite loss, or an optimizer step DeepSpeed skips on an overflowing gradient, does
    nonfinite: str = "stop"
    max_skipped_steps: int = 10  # with nonfinite=skip, stop after this many skips in a row
    # Resuming with a key that changes the data order (batch sizes, seed, data spec, loss recipe) changed:
    # refuse (exit 2 naming each key, old -> new) | carry (continue at the same number of samples seen in the
    # epoch, in the new layout). A changed model is always refused (docs/training.md, "Changing a run").
    resume_changes: str = "refuse"
    # Seconds a collective (gradient all-reduce, the per-step agreement, a checkpoint barrier) may wait for the
    # other ranks before this rank gives up (a lost peer: exit 124, requeue) instead of hanging.
    collective_timeout_s: float = 1800.0


@dataclass
class OptimConfig:
    """AdamW (alignclip.training.optim) and its schedule (alignclip.training.schedule)."""

    lr: float = 1e-3
    warmup_steps: int = 10_000
    min_lr: float = 0.0
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    grad_clip: float = 1.0  # 0 disables clipping
    adamw_impl: str = "auto"  # auto (= fused: one kernel over ZeRO's flat partition, CUDA and CPU) | foreach | loop
    # How fast the text side learns relative to the image side. Below 1, the text-only parameters (CLIP's text
    # stem and tower, SharedCLIP's text stem) step at this fraction of the lr, and parameters both modalities
    # share (SharedCLIP's trunk and projection) take the text path's gradient scaled by it: the text side cannot
    # settle on the caption words that are easy to see (colour) before the image side can see the hard ones
    # (shape), which would starve them (docs/study.md measures it).
    text_lr_scale: float = 1.0


@dataclass
class CheckpointConfig:
    every_steps: int = 1000  # 0: only at the end and on preemption
    keep: int = 3  # the newest complete checkpoints kept


@dataclass
class FastPathConfig:
    """The speed switches (docs/performance.md measures each on CPU and argues its H100 effect). null / auto:
    resolved per device by alignclip.training.fast_path.resolve_fast_path."""

    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    # torch.compile through engine.compile(); auto: on CUDA, off on CPU (no gain at the tiny sizes CPUs train here,
    # and tens of seconds to minutes of compiling at start)
    compile: Optional[bool] = None
    compile_mode: str = "default"  # torch.compile mode, e.g. max-autotune-no-cudagraphs
    sdpa: bool = True  # attention through F.scaled_dot_product_attention (flash kernels); false = explicit math
    channels_last: Optional[bool] = None  # NHWC images into the patch conv; auto: on CUDA (cuDNN's native layout)
    # Peak TFLOP/s of one device for MFU; 0 = the table of alignclip/training/peaks.py (H100, H200, A100 by name and
    # precision). CPUs have no entry: there perf/mfu is not logged unless this is set.
    peak_tflops: float = 0.0


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 1
    allgather_bucket_size: int = 200_000_000
    reduce_bucket_size: int = 200_000_000
    overlap_comm: bool = True
    universal_checkpoint: bool = False


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    log_every_steps: int = 10
    gap_every_steps: int = 200  # live gap metrics on the fixed held-out batch
    gap_batch_size: int = 256
    progress_bar: bool = True


@dataclass
class EvalConfig:
    """Zero-shot classification or retrieval while training (rank 0), logged as eval/<task>/<metric>."""

    every_steps: int = 0  # 0: never
    dataset: str = ""  # a kind of alignclip.eval.datasets: imagefolder | cifar10 | cifar100 | karpathy | wds
    root: str = ""
    annotations: str = ""  # karpathy: the Karpathy-split JSON
    split: str = "test"
    batch_size: int = 64
    workers: int = 0


@dataclass
class LaunchConfig:
    executor: str = "slurm"  # slurm | local
    nodes: int = 1
    gpus_per_node: int = 8
    tasks_per_node: int = 0  # 0 = gpus_per_node (one task per GPU); set it for CPU-only nodes (gpus_per_node=0)
    cpus_per_task: int = 12
    mem_gb: int = 0  # 0 = the partition's default
    timeout_min: int = 60 * 24
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    signal_lead_s: int = 120  # SIGUSR1 this long before the time limit
    array_parallelism: int = 16
    max_requeues: int = 20
    env_file: str = ""  # cluster environment (NCCL and friends); "" = slurm/env.sh


@dataclass
class Config:
    name: str = "default"  # the experiment; names the run directory
    output_dir: str = "runs"
    run_dir: str = ""  # "" = <output_dir>/<name>; stable across restarts, so requeued jobs find checkpoints
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    fast_path: FastPathConfig = field(default_factory=FastPathConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)


CHOICES = {
    "model.arch": ("clip", "sharedclip"),
    "model.vision.stem": ("patch", "hybrid", "conv"),
    "model.act": ("gelu", "quick_gelu"),
    "loss.impl": ("dense", "chunked", "triton", "auto"),
    "loss.imsep_sides": ("image", "text", "both"),
    "fast_path.precision": ("auto", "fp32", "bf16"),
    "train.device": ("auto", "cuda", "cpu"),
    "train.nonfinite": ("stop", "skip"),
    "data.decode": ("cpu", "gpu"),
    "train.resume_changes": ("refuse", "carry"),
    "optim.adamw_impl": ("auto", "fused", "foreach", "loop"),
    "deepspeed.zero_stage": (0, 1, 2),
    "launch.executor": ("slurm", "local"),
}


# -------------------------------------------------------------------------------------------- loading
def _describe(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    msg = getattr(err, "msg", None) or str(err).splitlines()[0]
    return f"key '{key}': {msg}" if key else msg


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[str, DictConfig]]:
    """The file and, first, the files its ``defaults:`` list names (depth first), as (source, config) pairs."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'defaults' forms a cycle through {[str(p) for p in seen]}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = OmegaConf.load(path)
    except Exception as err:  # a YAML syntax error
        raise ConfigError(f"{path}: cannot parse YAML: {err}") from err
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    parents = raw.pop("defaults", [])
    moved: list[str] = []
    move_old_keys(raw, str(path), moved)
    warn_moved_keys(moved, str(path))
    layers: list[tuple[str, DictConfig]] = []
    for parent in parents if isinstance(parents, (list, tuple)) or OmegaConf.is_list(parents) else [parents]:
        parent_path = (path.parent / str(parent)).with_suffix(".yaml") if not str(parent).endswith(".yaml") \
            else path.parent / str(parent)
        layers += _read_yaml(parent_path, seen + (path,))
    layers.append((str(path), raw))
    return layers


def resolve_config_path(name_or_path: str | Path) -> Path:
    """Accept a path, or a name under the shipped configs/ (``experiment/embedded_default``, with or without
    ``.yaml``); a relative path is tried from the working directory first."""
    p = Path(name_or_path)
    bases = [p, CONFIG_DIR / p]
    if len(p.parts) > 1 and p.parts[0] == "configs":  # "configs/experiment/X.yaml" as the docs write it: the
        bases.append(CONFIG_DIR.joinpath(*p.parts[1:]))  # shipped copy when run outside a checkout
    for candidate in (c for base in bases for c in (base, base.with_suffix(".yaml"))):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"config file not found: {name_or_path} (looked as a path and under {CONFIG_DIR})")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Schema defaults <- YAML (with its ``defaults:`` chain) <- ``key=value`` overrides, validated."""
    cfg = OmegaConf.structured(Config)
    OmegaConf.set_struct(cfg, True)
    layers = _read_yaml(resolve_config_path(path)) if path else []
    for source, layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as err:
            raise ConfigError(f"{source}: {_describe(err)}") from err
    moved: list[str] = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, value = item.split("=", 1)
        if key in MOVED_KEYS:
            moved.append(f"{key} -> {MOVED_KEYS[key]}")
            item = f"{MOVED_KEYS[key]}={value}"
        try:
            target = item.split("=", 1)[0]
            if value.strip() in ("", "null", "~") and not _optional(target):
                # `key=null` (or `key=`) clears an inherited value: back to the schema's default
                OmegaConf.update(cfg, target, _default(target), merge=False)
                continue
            cfg.merge_with_dotlist([item])
        except OmegaConfBaseException as err:
            raise ConfigError(f"command-line override '{item}': {_describe(err)}") from err
    warn_moved_keys(moved, "the command-line overrides")
    try:
        OmegaConf.resolve(cfg)
        config: Config = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        raise ConfigError(_describe(err)) from err
    validate(config, source=str(path) if path else "defaults")
    return config


def _optional(key: str) -> bool:
    """Whether the schema lets ``key`` be null (an unknown key counts as optional: merging it raises the error)."""
    import dataclasses
    import typing

    cls: Any = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls) or part not in {f.name for f in dataclasses.fields(cls)}:
            return True
        hint = typing.get_type_hints(cls)[part]
        if i == len(parts) - 1:
            return type(None) in typing.get_args(hint)
        cls = hint
    return True


def _default(key: str) -> Any:
    """The schema's default of a dotted key (``data.semantic_dir`` -> "")."""
    obj: Any = Config()
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def override_key(item: str) -> str:
    """The key a ``key=value`` override sets, by its current name (``train.lr`` -> ``optim.lr``)."""
    key = item.partition("=")[0].strip()
    return MOVED_KEYS.get(key, key)


def check_repeated_overrides(overrides: list[str] | tuple[str, ...] | Any) -> None:
    """A key given twice on a command line is an error: bash expands an unquoted
    ``data.train=/d/{00000..01242}.tar`` into 1,243 ``data.train=`` words, of which the last would silently win
    (the run would read one shard). Called where users' overrides enter (``parse_cli``, ``launch.make_run``), not
    in ``load_config``, whose internal callers layer override lists on purpose. ``run_dir`` may repeat: the
    launchers append the resolved absolute run dir after the user's overrides."""
    values: dict[str, list[str]] = {}
    spellings: dict[str, set[str]] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and key.strip() != "run_dir":
            canonical = override_key(item)  # train.lr and optim.lr are one key
            values.setdefault(canonical, []).append(value)
            spellings.setdefault(canonical, set()).add(key.strip())
    for key, given in values.items():
        if len(given) > 1:
            pattern = brace_pattern_of(given)
            hint = (f"; these look like the shell's expansion of a brace pattern: quote it, "
                    f"{key}='{pattern}'" if pattern else "; give it once")
            if len(spellings[key]) > 1:
                hint = f" (spelled {sorted(spellings[key])}; the train.* name is the old one){hint}"
            shown = given if len(given) <= 4 else given[:2] + ["..."] + given[-1:]
            raise ConfigError(f"command-line override key '{key}' is given {len(given)} times ({shown}){hint}")


def _get(config: Config, dotted: str) -> Any:
    obj: Any = config
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class Range:
    """The allowed values of a numeric key: finite, above ``low`` (or at it when ``low_inclusive``), below
    ``high`` (or at it when ``high_inclusive``); None = unbounded."""

    low: Optional[float] = None
    low_inclusive: bool = True
    high: Optional[float] = None
    high_inclusive: bool = True

    def admits(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (value == self.low and not self.low_inclusive)):
            return False
        return self.high is None or value < self.high or (value == self.high and self.high_inclusive)

    def describe(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>=' if self.low_inclusive else '>'} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<=' if self.high_inclusive else '<'} {self.high:g}")
        return "a finite number" + (" " + " and ".join(parts) if parts else "")


POSITIVE, NON_NEGATIVE, AT_LEAST_ONE = Range(0, False), Range(0), Range(1)
UNIT_OPEN = Range(0, True, 1, False)  # Adam's betas: [0, 1)

# Every numeric key of the schema (a test checks that none is missing), checked at load time before anything is
# built: a zero head count or patch size would otherwise fail deep inside the model (or divide by zero here).
RANGES: dict[str, Range] = {
    **{f"model.{tower}.{key}": POSITIVE for tower in ("vision", "text")
       for key in ("width", "layers", "heads", "mlp_ratio")},
    "model.vision.image_size": POSITIVE, "model.vision.patch_size": POSITIVE,
    "model.vision.stem_channels": NON_NEGATIVE,
    "model.text.context_length": Range(2),  # <start> and <end> at least
    "model.text.vocab_size": Range(3),  # the two special tokens and one more
    "model.embed_dim": POSITIVE, "model.init_temperature": POSITIVE, "model.max_logit_scale": POSITIVE,
    **{f"loss.{term}_weight": NON_NEGATIVE for term in ("clip", "crsep", "imsep", "uniform", "xuniform", "align")},
    "loss.chunk_size": POSITIVE, "loss.semantic_batch_size": POSITIVE,
    "loss.imsep_start_step": NON_NEGATIVE, "loss.imsep_ramp_steps": NON_NEGATIVE,
    "data.samples_per_epoch": NON_NEGATIVE, "data.workers": NON_NEGATIVE, "data.shuffle_buffer": NON_NEGATIVE,
    "data.prefetch_factor": POSITIVE, "data.io_timeout_s": POSITIVE, "data.io_retries": NON_NEGATIVE,
    "data.max_image_pixels": NON_NEGATIVE, "data.loader_timeout_s": NON_NEGATIVE,
    "data.generated.num_shards": POSITIVE, "data.generated.samples_per_shard": POSITIVE,
    "data.generated.image_size": POSITIVE, "data.generated.val_samples": NON_NEGATIVE,
    "data.generated.seed": NON_NEGATIVE, "data.generated.version": Range(1, True, 3, True),
    "data.generated.caption_coverage": Range(0, True, 1, True),
    "data.generated.colour_coverage": Range(0, True, 1, True), "data.generated.captions_per_image": AT_LEAST_ONE,
    "data.generated.max_objects": Range(1, True, 3, True),  # the v2 scene layout places at most 3 apart
    "train.seed": NON_NEGATIVE,  # numpy seeds are unsigned
    "train.epochs": POSITIVE, "train.max_steps": NON_NEGATIVE,
    "train.global_batch_size": POSITIVE, "train.micro_batch_size": NON_NEGATIVE,
    "train.max_skipped_steps": NON_NEGATIVE, "train.collective_timeout_s": POSITIVE,
    "optim.lr": POSITIVE, "optim.warmup_steps": NON_NEGATIVE, "optim.min_lr": NON_NEGATIVE,
    "optim.weight_decay": NON_NEGATIVE, "optim.beta1": UNIT_OPEN, "optim.beta2": UNIT_OPEN, "optim.eps": POSITIVE,
    "optim.grad_clip": NON_NEGATIVE, "optim.text_lr_scale": Range(0, False, 1, True),
    "checkpoint.every_steps": NON_NEGATIVE, "checkpoint.keep": AT_LEAST_ONE,
    "fast_path.peak_tflops": NON_NEGATIVE,
    "deepspeed.allgather_bucket_size": POSITIVE, "deepspeed.reduce_bucket_size": POSITIVE,
    "logging.log_every_steps": NON_NEGATIVE, "logging.gap_every_steps": NON_NEGATIVE,
    "logging.gap_batch_size": POSITIVE,
    "eval.every_steps": NON_NEGATIVE, "eval.batch_size": POSITIVE, "eval.workers": NON_NEGATIVE,
    "launch.nodes": POSITIVE, "launch.gpus_per_node": NON_NEGATIVE, "launch.tasks_per_node": NON_NEGATIVE,
    "launch.cpus_per_task": POSITIVE, "launch.mem_gb": NON_NEGATIVE, "launch.timeout_min": POSITIVE,
    "launch.signal_lead_s": NON_NEGATIVE, "launch.array_parallelism": POSITIVE, "launch.max_requeues": NON_NEGATIVE,
}


def validate(config: Config, source: str = "config") -> None:
    """Checks that types alone cannot express; each error names the key and what is allowed."""
    for key, allowed in RANGES.items():
        value = _get(config, key)
        if not allowed.admits(value):
            raise ConfigError(f"{source}: key '{key}' is {value!r}; expected {allowed.describe()}")
    for key, choices in CHOICES.items():
        value = _get(config, key)
        if value not in choices:
            raise ConfigError(f"{source}: key '{key}' is {value!r}; expected one of {list(choices)}")
    m = config.model
    if m.arch == "sharedclip":
        for attr in ("width", "layers", "heads", "mlp_ratio"):
            if getattr(m.vision, attr) != getattr(m.text, attr):
                raise ConfigError(
                    f"{source}: sharedclip shares one block stack, so 'model.vision.{attr}' "
                    f"({getattr(m.vision, attr)}) must equal 'model.text.{attr}' ({getattr(m.text, attr)})")
    for tower in ("vision", "text"):
        t = getattr(m, tower)
        if t.width % t.heads:
            raise ConfigError(f"{source}: key 'model.{tower}.width' ({t.width}) must be divisible by "
                              f"'model.{tower}.heads' ({t.heads})")
    if m.vision.image_size % m.vision.patch_size:
        raise ConfigError(f"{source}: key 'model.vision.image_size' ({m.vision.image_size}) must be a multiple "
                          f"of 'model.vision.patch_size' ({m.vision.patch_size})")
    if m.vision.stem == "conv" and (m.vision.patch_size < 2 or m.vision.patch_size & (m.vision.patch_size - 1)):
        raise ConfigError(f"{source}: key 'model.vision.patch_size' ({m.vision.patch_size}) must be a power of two "
                          f"when 'model.vision.stem' is 'conv' (one stride-2 convolution per halving)")
    if m.vision.stem == "hybrid" and m.vision.patch_size % 4:
        raise ConfigError(f"{source}: key 'model.vision.patch_size' ({m.vision.patch_size}) must be a multiple of 4 "
                          f"when 'model.vision.stem' is 'hybrid' (its ResNet root reduces the image 4x)")
    if m.vision.stem != "conv" and m.vision.stem_channels:
        raise ConfigError(f"{source}: key 'model.vision.stem_channels' ({m.vision.stem_channels}) applies to the "
                          f"'conv' stem only; 'model.vision.stem' is {m.vision.stem!r}")
    if config.eval.every_steps and not (config.eval.dataset and config.eval.root):
        raise ConfigError(f"{source}: key 'eval.every_steps' is {config.eval.every_steps} but 'eval.dataset' and "
                          f"'eval.root' are not both set")
    if m.norm_eps is not None and not m.norm_eps > 0:
        raise ConfigError(f"{source}: key 'model.norm_eps' must be > 0 (or null), got {m.norm_eps}")
    if config.optim.min_lr > config.optim.lr:
        raise ConfigError(f"{source}: key 'optim.min_lr' ({config.optim.min_lr:g}) must not exceed 'optim.lr' "
                          f"({config.optim.lr:g}): the schedule decays from lr to min_lr")


# -------------------------------------------------------------------------------------------- helpers
def to_yaml(config: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def from_yaml_text(text: str) -> Config:
    """Rebuild a Config from a resolved YAML dump (a run directory's config.yaml, an export's metadata)."""
    saved = upgrade_saved_config(OmegaConf.create(text))
    cfg = OmegaConf.merge(OmegaConf.structured(Config), saved)
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


def with_saved_norm_eps(config: Config, run_dir: str | Path) -> tuple[Config, bool]:
    """(config, changed): a run directory whose saved config predates ``model.norm_eps`` (the key missing or
    null) trained with the old mixed eps, so resuming it keeps them (``norm_eps`` None) rather than continuing its
    weights under another normalisation."""
    saved_path = Path(run_dir) / "config.yaml"
    if config.model.norm_eps is None or not saved_path.is_file():
        return config, False
    saved = OmegaConf.create(saved_path.read_text())
    if "model" not in saved or saved.model.get("norm_eps") is not None:
        return config, False
    from dataclasses import replace

    return replace(config, model=replace(config.model, norm_eps=None)), True


def saved_text_lr_scale(run_dir: str | Path) -> Optional[float]:
    """``optim.text_lr_scale`` in a run directory's saved config.yaml: 1.0 when the saved config predates the key
    (that run trained without text groups), None when there is no config.yaml."""
    saved_path = Path(run_dir) / "config.yaml"
    if not saved_path.is_file():
        return None
    saved = OmegaConf.create(saved_path.read_text())
    return float(OmegaConf.select(saved, "optim.text_lr_scale", default=1.0))


def config_hash(config: Config) -> str:
    """A short digest of the resolved config; checkpoints record it so a resume can tell what changed. The
    ``launch`` section is left out: resources and time limits say where a run goes, not what it trains."""
    from dataclasses import replace

    return hashlib.sha256(to_yaml(replace(config, launch=LaunchConfig())).encode()).hexdigest()[:16]


def run_dir_of(config: Config) -> Path:
    return Path(config.run_dir) if config.run_dir else Path(config.output_dir) / config.name


def save_config(config: Config, run_dir: str | Path) -> Path:
    """Write the fully resolved config into the run directory (atomically)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return atomic_write(run_dir / "config.yaml", to_yaml(config))


def parse_cli(argv: Optional[list[str]] = None, prog: str = "alignclip") -> tuple[Config, list[str]]:
    """``--config PATH key=value ...`` -> (config, overrides); raises ``ConfigError`` (the entry point's
    ``run_command`` reports it). ``--help`` and a malformed command line are argparse's (exit 2)."""
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--config", "-c", default=None, help="YAML file or a name under configs/")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, applied last")
    args = parser.parse_args(argv)
    check_repeated_overrides(args.overrides)
    return load_config(args.config, args.overrides), list(args.overrides)


def main(argv: Optional[list[str]] = None) -> int:
    prog = "python -m alignclip.config"
    return run_command(prog, lambda: print(to_yaml(parse_cli(argv, prog=prog)[0]), end=""))


if __name__ == "__main__":
    raise SystemExit(main())
