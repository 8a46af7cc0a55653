"""Race our trainer against OpenCLIP's on the same small ViT-CLIP, the same inputs and the same math, on CPU.

Both sides train ONE architecture (``RACE_MODEL``, or any ``arch: clip`` model config), from the SAME initial
weights (ours are copied into OpenCLIP's module through ``openclip_name``), on the SAME seeded synthetic batches, in
fp32 with the same number of threads:

  ours      ``alignclip.training.trainer.Stepper.train_step`` over the components that ``alignclip.train`` builds
            (``alignclip.training.components.build_components``): the fast path resolved for CPU, DeepSpeed (ZeRO stage 1, world size 1, gloo), the
            objective with ``clip_weight=1`` (the mean of the two cross-entropies), ``engine.backward``,
            ``engine.step`` (AdamW of ``training.optim``, gradient clipping inside DeepSpeed), the lr of
            ``schedule.lr_at`` -- exactly what the trainer runs per step.
  OpenCLIP  the body of ``open_clip_train.train.train_one_epoch`` at ``accum_freq=1``, fp32 (no autocast, no
            GradScaler): ``cosine_lr`` scheduler, ``zero_grad``, ``model(images, texts)``, ``ClipLoss``,
            ``backward``, ``clip_grad_norm_``, ``AdamW.step`` over ``open_clip_train.main``'s two parameter groups,
            the in-place logit-scale clamp.

The one structural difference is fixed on OpenCLIP's side: our blocks are timm's ``Block``, whose LayerNorms use
eps = 1e-6, OpenCLIP's ``ResidualAttentionBlock`` uses torch's 1e-5; the race sets OpenCLIP's block norms to 1e-6
(the stem and final norms are 1e-5 on both sides). Everything else matches parameter for parameter: the bias-free
patch conv, class token, positional embeddings and pre-norm; q, k, v packed in one [3 w, w] matrix with a bias in
the same [q; k; v] head-major layout; the causal text mask; end-of-text pooling at the argmax of the ids; the final
LayerNorm before pooling (OpenCLIP) or after it (ours: LayerNorm acts per token, so the two agree); the bias-free
projections (ours ``nn.Linear`` weights are OpenCLIP's matrices transposed); the logit scale (ours has shape [1]).
The logit-scale clamps are the identity on both sides while the scale stays below ln 100 (ours clamps in forward and
the stored value after each step; OpenCLIP the stored value to [0, ln 100] after each step).

The two sides live in ONE process (the same thread pool, allocator and libraries) and alternate STEP BY STEP: each
repeat times ``steps`` steps of each side, ours then OpenCLIP on even steps, OpenCLIP then ours on odd ones, after
``warmup_steps`` untimed steps per side. On a machine whose load changes within seconds (other jobs on the same
cores), alternating whole blocks of steps hands one side a busy stretch and the other a quiet one; alternating each
step exposes both to the same load.
"""

from __future__ import annotations

import math
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from alignclip.config import Config, ConfigError, ModelConfig, load_config
from alignclip.models.factory import norm_eps_of

# A small ViT-CLIP: 64 px images in 8 px patches (65 tokens with the class token), width 256 (4 heads of 64, MLP
# 1024), 4 blocks per tower, 32-token text, 256-d joint embedding. Small enough for two CPU cores (one to two seconds
# a step at batch 64), big enough that the transformer's GEMMs, not per-step bookkeeping, dominate the step, as they
# do for real models: 6.6 M parameters in the towers plus the 12.6 M token table that the optimizer sweeps every
# step (19.2 M in all).
RACE_MODEL = ("model.arch=clip", "model.embed_dim=256",
              "model.vision.image_size=64", "model.vision.patch_size=8", "model.vision.width=256",
              "model.vision.layers=4", "model.vision.heads=4",
              "model.text.context_length=32", "model.text.width=256", "model.text.layers=4", "model.text.heads=4")
# The race's loss: CLIP's alone, the mean of the two cross-entropies (OpenCLIP's ClipLoss).
CLIP_LOSS_ONLY = ("loss.clip_weight=1.0", "loss.crsep_weight=0.0", "loss.imsep_weight=0.0",
                  "loss.uniform_weight=0.0", "loss.xuniform_weight=0.0", "loss.align_weight=0.0")

SOT_ID, EOT_ID = 49406, 49407  # CLIP BPE's start / end of text; end of text is the largest id of every row


# ----------------------------------------------------------------------------------------------------------------
# The two models, and the name mapping between them


def build_openclip_model(model_cfg: ModelConfig) -> nn.Module:
    """OpenCLIP's ``CLIP`` with the shape of ``model_cfg`` (an ``arch: clip`` config), returning a dict."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    if model_cfg.arch != "clip":
        raise ConfigError(f"the OpenCLIP race needs model.arch 'clip' (two towers, as OpenCLIP's CLIP); got "
                          f"{model_cfg.arch!r}")
    v, t = model_cfg.vision, model_cfg.text
    for tower, cfg in (("vision", v), ("text", t)):
        if cfg.width % cfg.heads:
            raise ConfigError(f"model.{tower}.width ({cfg.width}) must be a multiple of model.{tower}.heads "
                              f"({cfg.heads}) for OpenCLIP's head_width")
    vision = CLIPVisionCfg(layers=v.layers, width=v.width, head_width=v.width // v.heads, mlp_ratio=v.mlp_ratio,
                           patch_size=v.patch_size, image_size=v.image_size)
    text = CLIPTextCfg(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width, heads=t.heads,
                       layers=t.layers, mlp_ratio=t.mlp_ratio)
    model = CLIP(model_cfg.embed_dim, vision, text, quick_gelu=False,
                 init_logit_scale=math.log(1.0 / model_cfg.init_temperature), output_dict=True)
    # Our LayerNorm eps (model.norm_eps; checkpoints older than that key: 1e-6 inside the blocks)
    block_eps, outer_eps = norm_eps_of(model_cfg)
    for block in (*model.visual.transformer.resblocks, *model.transformer.resblocks):
        block.ln_1.eps = block.ln_2.eps = block_eps
    model.visual.ln_pre.eps = model.visual.ln_post.eps = model.ln_final.eps = outer_eps
    return model


_BLOCK_NAMES = {"norm1": "ln_1", "attn.qkv.weight": "attn.in_proj_weight", "attn.qkv.bias": "attn.in_proj_bias",
                "attn.proj": "attn.out_proj", "norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_FIXED_NAMES = {
    "image_stem.patch_embed.weight": "visual.conv1.weight", "image_stem.class_token": "visual.class_embedding",
    "image_stem.pos_embed": "visual.positional_embedding", "image_stem.norm_pre.weight": "visual.ln_pre.weight",
    "image_stem.norm_pre.bias": "visual.ln_pre.bias", "image_trunk.norm.weight": "visual.ln_post.weight",
    "image_trunk.norm.bias": "visual.ln_post.bias", "image_trunk.proj.weight": "visual.proj",
    "text_stem.token_embed.weight": "token_embedding.weight", "text_stem.pos_embed": "positional_embedding",
    "text_trunk.norm.weight": "ln_final.weight", "text_trunk.norm.bias": "ln_final.bias",
    "text_trunk.proj.weight": "text_projection", "logit_scale": "logit_scale"}
_TRANSPOSED = {"image_trunk.proj.weight", "text_trunk.proj.weight"}  # nn.Linear [out, in] vs OpenCLIP's x @ [in, out]


def openclip_name(our_name: str) -> str:
    """The OpenCLIP parameter holding the same values as our parameter ``our_name`` (a CLIP model)."""
    if our_name in _FIXED_NAMES:
        return _FIXED_NAMES[our_name]
    m = re.fullmatch(r"(image|text)_trunk\.blocks\.(\d+)\.(.+)", our_name)
    if m:
        tower = "visual.transformer" if m.group(1) == "image" else "transformer"
        rest = m.group(3)
        for ours, theirs in _BLOCK_NAMES.items():
            if rest == ours or rest.startswith(ours + "."):
                return f"{tower}.resblocks.{m.group(2)}.{theirs}{rest[len(ours):]}"
    raise KeyError(f"no OpenCLIP counterpart known for parameter {our_name!r}")


def as_openclip_tensor(our_name: str, value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Our parameter's value laid out as OpenCLIP's (transposed projections, the [1] logit scale as [])."""
    value = value.t() if our_name in _TRANSPOSED else value
    return value.reshape(like.shape)


def copy_weights_to_openclip(ours: nn.Module, theirs: nn.Module) -> None:
    """Give OpenCLIP's model our parameters' values, so both sides start from the same point."""
    their_params = dict(theirs.named_parameters())
    mapped = set()
    with torch.no_grad():
        for name, param in ours.named_parameters():
            target = their_params[openclip_name(name)]
            target.copy_(as_openclip_tensor(name, param, target))
            mapped.add(openclip_name(name))
    missing = sorted(set(their_params) - mapped)
    if missing:
        raise KeyError(f"OpenCLIP parameters with no counterpart in ours: {missing}")


def max_parameter_difference(ours: nn.Module, theirs: nn.Module) -> tuple[float, str]:
    """The largest |ours - OpenCLIP| entry over all parameters, and which of our parameters holds it."""
    their_params = dict(theirs.named_parameters())
    worst, where = 0.0, ""
    for name, param in ours.named_parameters():
        target = their_params[openclip_name(name)]
        diff = float((as_openclip_tensor(name, param.detach(), target) - target.detach()).abs().max())
        if diff > worst:
            worst, where = diff, name
    return worst, where


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------------
# Inputs


def synthetic_batches(model_cfg: ModelConfig, batch_size: int, count: int, seed: int = 0) -> list[dict]:
    """``count`` batches of seeded images (standard normal) and token rows: start of text, random ids, end of text
    at a random position, zero padding -- as the CLIP tokenizer lays them out."""
    v, t = model_cfg.vision, model_cfg.text
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        images = torch.randn(batch_size, 3, v.image_size, v.image_size, generator=gen)
        tokens = torch.zeros(batch_size, t.context_length, dtype=torch.long)
        tokens[:, 0] = SOT_ID
        ends = torch.randint(2, t.context_length, (batch_size,), generator=gen)
        words = torch.randint(1, min(SOT_ID, t.vocab_size - 2), (batch_size, t.context_length), generator=gen)
        for row, end in enumerate(ends.tolist()):
            tokens[row, 1:end] = words[row, 1:end]
            tokens[row, end] = min(EOT_ID, t.vocab_size - 1)
        batches.append({"image": images, "text": tokens})
    return batches


# ----------------------------------------------------------------------------------------------------------------
# The two trainers


def _model_config_path(model: Optional[str]) -> Optional[str]:
    """A bare name (``clip_tiny``) means configs/model/<name>.yaml; paths and ``model/NAME`` pass through."""
    if model and "/" not in model and not model.endswith(".yaml") and not Path(model).exists():
        return f"model/{model}"
    return model


def race_config(model: Optional[str] = None, batch_size: int = 64, total_steps: int = 22, lr: float = 5e-4,
                lr_warmup_steps: int = 2, grad_clip: float = 1.0, overrides: tuple[str, ...] = ()) -> Config:
    """The project config both sides train with: ``model`` (a config name such as ``model/clip_tiny``, or None for
    ``RACE_MODEL``), CLIP's loss alone, fp32 on CPU, AdamW (0.9, 0.98, 1e-6, weight decay 0.1), cosine lr over
    ``total_steps`` after a linear warmup; ``overrides`` (``key=value``) come last and act on OUR side (e.g.
    ``deepspeed.zero_stage=0``, ``optim.adamw_impl=fused``); a change to the model or the loss is refused."""
    model = _model_config_path(model)
    config = load_config(model, [*(() if model else RACE_MODEL), *CLIP_LOSS_ONLY,
                                 f"train.global_batch_size={batch_size}", "train.micro_batch_size=0",
                                 f"train.max_steps={total_steps}", f"optim.lr={lr}",
                                 f"optim.warmup_steps={lr_warmup_steps}", f"optim.grad_clip={grad_clip}",
                                 "fast_path.precision=fp32", "train.device=cpu", *overrides])
    reference = load_config(model, [*(() if model else RACE_MODEL), *CLIP_LOSS_ONLY])
    for section in ("model", "loss"):
        if getattr(config, section) != getattr(reference, section):
            raise ConfigError(f"the race compares the same model and loss on both sides: overrides of "
                              f"'{section}.*' are not allowed ({[o for o in overrides if o.startswith(section)]})")
    if config.model.arch != "clip":
        raise ConfigError(f"the OpenCLIP race needs model.arch 'clip' (two towers, as OpenCLIP's CLIP); "
                          f"{model} has {config.model.arch!r}")
    return config


class OursTrainer:
    """Our per-step path, as ``alignclip.train`` builds and runs it on one rank: ``build_components`` (the fast
    path resolved for CPU, the engine over ``build_optimizer``'s AdamW, the objective), from the step plan
    (``alignclip.training.plan.plan_step``), and ``Stepper.train_step``, the trainer's step."""

    name = "ours"

    def __init__(self, config: Config, model: nn.Module, total_steps: int, pooled_last_block: Optional[bool] = None):
        from alignclip.distributed.env import setup_distributed_env
        from alignclip.training.components import build_components
        from alignclip.training.plan import plan_step
        from alignclip.training.trainer import Stepper

        if pooled_last_block is not None:  # else as the config says (model.pooled_last_block, on by default)
            model.set_pooled_last_block(pooled_last_block)
        self.trainer = Stepper(build_components(plan_step(config, setup_distributed_env()), model=model), total_steps)

    @property
    def model(self) -> nn.Module:
        return self.trainer.components.model

    def describe(self) -> str:
        cfg = self.trainer.config
        pooled = self.model.image_trunk.pooled_last_block
        return (f"DeepSpeed ZeRO stage {cfg.deepspeed.zero_stage}, world size 1 (gloo), fp32, "
                f"grad clip {cfg.optim.grad_clip:g}; {self.trainer.components.fast.describe()}; "
                f"pooled_last_block={pooled}")

    def step(self, batch: dict) -> float:
        return self.trainer.train_step(batch).local_loss()  # one rank: the global-batch loss


class OpenCLIPTrainer:
    """OpenCLIP's per-step path: ``train_one_epoch``'s body at ``accum_freq=1``, fp32, one process."""

    name = "openclip"

    def __init__(self, config: Config, model: nn.Module, total_steps: int):
        from open_clip.loss import ClipLoss
        from open_clip_train.scheduler import cosine_lr

        optim = config.optim
        self.model, self.grad_clip = model, optim.grad_clip
        # open_clip_train.main: no weight decay on gains, biases and the logit scale
        exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
        named = list(model.named_parameters())
        self.optimizer = torch.optim.AdamW(
            [{"params": [p for n, p in named if exclude(n, p) and p.requires_grad], "weight_decay": 0.0},
             {"params": [p for n, p in named if not exclude(n, p) and p.requires_grad],
              "weight_decay": optim.weight_decay}],
            lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps)
        self.scheduler = cosine_lr(self.optimizer, optim.lr, optim.warmup_steps, total_steps)
        self.loss = ClipLoss()
        self.step_index = 0
        model.train()

    def step(self, batch: dict) -> float:
        self.scheduler(self.step_index)
        images, texts = batch["image"], batch["text"]
        self.optimizer.zero_grad()
        model_out = self.model(images, texts)
        losses = self.loss(**model_out, output_dict=True)
        total_loss = sum(losses.values())
        total_loss.backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip, norm_type=2.0)
        self.optimizer.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))
        self.step_index += 1
        return float(total_loss.detach())


def build_trainers(config: Config, total_steps: int, seed: int = 0,
                   pooled_last_block: Optional[bool] = None) -> tuple[OursTrainer, OpenCLIPTrainer]:
    """Both trainers, starting from the same weights (our initialisation, copied into OpenCLIP's model).
    ``pooled_last_block``: whether our trunks' last blocks run at the pooled row only (same math, less work);
    None keeps the config's ``model.pooled_last_block`` (on by default, as in the trainer)."""
    from alignclip.models import build_model

    torch.manual_seed(seed)
    ours = build_model(config.model)
    theirs = build_openclip_model(config.model)
    if count_parameters(ours) != count_parameters(theirs):
        raise AssertionError(f"parameter counts differ: ours {count_parameters(ours):,}, OpenCLIP "
                             f"{count_parameters(theirs):,}")
    copy_weights_to_openclip(ours, theirs)
    return OursTrainer(config, ours, total_steps, pooled_last_block), OpenCLIPTrainer(config, theirs, total_steps)


# ----------------------------------------------------------------------------------------------------------------
# The race


@dataclass
class RaceRow:
    repeat: int
    ours_samples_per_s: float
    openclip_samples_per_s: float
    ours_loss: float  # the last timed step's loss on each side: the same math keeps them together
    openclip_loss: float

    @property
    def ratio(self) -> float:
        """ours / OpenCLIP: above 1 we are faster."""
        return self.ours_samples_per_s / self.openclip_samples_per_s


@dataclass
class RaceResult:
    config: Config
    steps: int  # timed steps per side and repeat
    warmup_steps: int  # untimed steps per side before the first repeat
    threads: int
    parameters: int  # the same on both sides (checked)
    ours_path: str  # what our side ran (engine, fast-path switches)
    rows: list[RaceRow] = field(default_factory=list)
    first_losses: tuple[float, float] = (math.nan, math.nan)  # the very first step's, ours and OpenCLIP's
    parameter_difference: tuple[float, str] = (math.nan, "")  # after the race: max |ours - OpenCLIP| and where

    @property
    def batch_size(self) -> int:
        return self.config.train.global_batch_size

    @property
    def median_ratio(self) -> float:
        return statistics.median(r.ratio for r in self.rows)


def _interleaved(ours, theirs, batches: list[dict], start: int, steps: int) -> RaceRow:
    """One repeat: ``steps`` steps of each side, interleaved step by step (ours first on even steps, OpenCLIP first
    on odd ones), each step timed on its own; samples/s of a side = its samples / the sum of its step times."""
    seconds, losses = {ours.name: 0.0, theirs.name: 0.0}, {}
    for i in range(start, start + steps):
        batch = batches[i % len(batches)]
        for trainer in ((ours, theirs) if i % 2 == 0 else (theirs, ours)):
            began = time.perf_counter()
            losses[trainer.name] = trainer.step(batch)
            seconds[trainer.name] += time.perf_counter() - began
    samples = steps * batches[0]["image"].shape[0]
    return RaceRow(0, samples / seconds[ours.name], samples / seconds[theirs.name], losses[ours.name],
                   losses[theirs.name])


def run_race(model: Optional[str] = None, batch_size: int = 64, steps: int = 4, repeats: int = 5,
             warmup_steps: int = 2, threads: Optional[int] = None, grad_clip: float = 1.0,
             overrides: tuple[str, ...] = (), pooled_last_block: Optional[bool] = None, seed: int = 0,
             distinct_batches: int = 4, on_start: Optional[Callable[[RaceResult], None]] = None,
             on_row: Optional[Callable[[RaceRow], None]] = None) -> RaceResult:
    """``repeats`` rows of ``steps`` timed steps per side, the two sides alternating step by step, after
    ``warmup_steps`` untimed steps per side. Both sides see the same batch at the same step index (and the same lr),
    so their losses stay comparable. ``on_start`` receives the (empty) result once both sides are built and warm
    (DeepSpeed prints while it builds), ``on_row`` each repeat's row as soon as it is measured."""
    if threads:
        torch.set_num_threads(threads)
    total_steps = warmup_steps + repeats * steps
    config = race_config(model, batch_size, total_steps, grad_clip=grad_clip, overrides=overrides)
    batches = synthetic_batches(config.model, batch_size, distinct_batches, seed=seed + 1)
    ours, theirs = build_trainers(config, total_steps, seed=seed, pooled_last_block=pooled_last_block)
    result = RaceResult(config=config, steps=steps, warmup_steps=warmup_steps, threads=torch.get_num_threads(),
                        parameters=count_parameters(ours.model), ours_path=ours.describe())
    first = [math.nan, math.nan]
    for side, trainer in enumerate((ours, theirs)):
        for i in range(warmup_steps):
            loss = trainer.step(batches[i % len(batches)])
            first[side] = loss if i == 0 else first[side]
    result.first_losses = (first[0], first[1])
    if on_start is not None:
        on_start(result)
    position = warmup_steps
    for repeat in range(repeats):
        row = _interleaved(ours, theirs, batches, position, steps)
        row.repeat, position = repeat + 1, position + steps
        result.rows.append(row)
        if on_row is not None:
            on_row(row)
    result.parameter_difference = max_parameter_difference(ours.model, theirs.model)
    return result


# ----------------------------------------------------------------------------------------------------------------
# Printing


def describe_model(model_cfg: ModelConfig) -> str:
    v, t = model_cfg.vision, model_cfg.text
    return (f"ViT {v.image_size} px / patch {v.patch_size} ({(v.image_size // v.patch_size) ** 2 + 1} tokens), "
            f"width {v.width}, {v.layers} layers, {v.heads} heads, MLP x{v.mlp_ratio:g}; text {t.context_length} "
            f"tokens, width {t.width}, {t.layers} layers, {t.heads} heads, MLP x{t.mlp_ratio:g}, vocab {t.vocab_size}; "
            f"embed {model_cfg.embed_dim}")


def format_header(config: Config, threads: int, steps: int, warmup_steps: int, repeats: int) -> str:
    return "\n".join([
        f"model: {describe_model(config.model)}",
        f"batch {config.train.global_batch_size}, fp32, {threads} threads, CLIP loss, AdamW lr {config.optim.lr:g} "
        f"(cosine, {config.optim.warmup_steps} warmup steps) wd {config.optim.weight_decay:g}, grad clip "
        f"{config.optim.grad_clip:g}",
        f"{repeats} repeats x {steps} timed steps per side, the sides alternating step by step, after "
        f"{warmup_steps} untimed steps per side; one process"])


TABLE_HEADER = (f"{'repeat':>6} {'ours samples/s':>15} {'OpenCLIP samples/s':>19} {'ratio':>6} {'loss ours':>10} "
                f"{'loss OpenCLIP':>14}")


def format_row(row: RaceRow) -> str:
    return (f"{row.repeat:>6} {row.ours_samples_per_s:>15.2f} {row.openclip_samples_per_s:>19.2f} "
            f"{row.ratio:>6.3f} {row.ours_loss:>10.5f} {row.openclip_loss:>14.5f}")


def format_summary(result: RaceResult) -> str:
    ours = statistics.median(r.ours_samples_per_s for r in result.rows)
    theirs = statistics.median(r.openclip_samples_per_s for r in result.rows)
    diff, where = result.parameter_difference
    steps = result.warmup_steps + len(result.rows) * result.steps
    return "\n".join([
        f"{'median':>6} {ours:>15.2f} {theirs:>19.2f} {result.median_ratio:>6.3f}",
        f"median ratio ours / OpenCLIP (of the per-repeat ratios): {result.median_ratio:.3f}",
        f"same math: first-step loss ours {result.first_losses[0]:.6f}, OpenCLIP {result.first_losses[1]:.6f}; "
        f"after {steps} steps the largest parameter difference is {diff:.1e} = {diff / result.config.optim.lr:.1e} "
        f"lr ({where})",
        f"ours ran: {result.ours_path}"])


def format_table(result: RaceResult) -> str:
    return "\n".join([TABLE_HEADER, "-" * len(TABLE_HEADER), *(format_row(r) for r in result.rows),
                      format_summary(result)])


# ----------------------------------------------------------------------------------------------------------------
# Profile


def profile_sides(model: Optional[str] = None, batch_size: int = 64, steps: int = 2, warmup_steps: int = 2,
                  threads: Optional[int] = None, grad_clip: float = 1.0, overrides: tuple[str, ...] = (),
                  pooled_last_block: Optional[bool] = None, row_limit: int = 25, sort_by: str = "self_cpu_time_total") -> dict[str, str]:
    """torch.profiler's per-op table of each side over ``steps`` steps, after ``warmup_steps`` untimed ones."""
    from torch.profiler import ProfilerActivity, profile

    if threads:
        torch.set_num_threads(threads)
    total_steps = warmup_steps + steps
    config = race_config(model, batch_size, total_steps, grad_clip=grad_clip, overrides=overrides)
    batches = synthetic_batches(config.model, batch_size, 2, seed=1)
    tables = {}
    for trainer in build_trainers(config, total_steps, pooled_last_block=pooled_last_block):
        for i in range(warmup_steps):
            trainer.step(batches[i % len(batches)])
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(steps):
                trainer.step(batches[i % len(batches)])
        tables[trainer.name] = prof.key_averages().table(sort_by=sort_by, row_limit=row_limit)
    return tables
