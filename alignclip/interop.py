"""Any CLIP we can represent exactly, read as our ``ContrastiveModel``: our exports and runs, OpenCLIP's and
Hugging Face's models.

    open_model("exported/x.safetensors")              # ours (alignclip-export's default format)
    open_model("runs/NAME")                           # a run directory: its latest checkpoint (unpickles it)
    open_model("local-dir:exported/x_openclip")       # OpenCLIP: a local-dir / hf-hub folder (or the bare path)
    open_model("hf-hub:org/name")                     # OpenCLIP, from the local Hugging Face cache
    open_model("ViT-B-32:laion2b_s34b_b79k")          # OpenCLIP's pretrained name:tag, weights in the local cache
    open_model("exported/x_hf")                       # a transformers CLIPModel folder (config.json + weights)

Each gives an ``OpenedModel``: the model and a ``Config`` whose ``model`` section describes it. The image
preprocessing the source declares must be the one we run (resize the short side, centre crop, bicubic, CLIP
mean/std), else it is refused. OpenCLIP's and HF's CLIP are the same pre-norm ViT as ours (alignclip.models.convert);
what we cannot express (layer scale, attentional pooling, other towers, other normalisation) is refused with a
message naming what differs, never approximated.

``init_weights(model, model_config)`` is ``model.init_from``: the source's weights into a model built from the
training config, whose shape must match the source's (the error lists the overrides that make it match).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from alignclip.config import Config, ConfigError, ModelConfig, TextConfig, VisionConfig
from alignclip.data.transforms import CLIP_MEAN, CLIP_STD, ImageTransform
from alignclip.export import TIMM_TOWER_DIR

log = logging.getLogger(__name__)

OPENCLIP_PREFIXES = ("local-dir:", "hf-hub:")


@dataclass
class OpenedModel:
    model: nn.Module  # our ContrastiveModel, eval mode
    config: Config  # ours for our exports and runs; else the defaults with ``model`` describing the source
    kind: str  # alignclip | openclip | hf
    source: str


# ------------------------------------------------------------------------------------------ what the spec names
def foreign_kind(spec: str) -> str | None:
    """'openclip' or 'hf' when ``spec`` names an OpenCLIP or Hugging Face CLIP model, else None."""
    path = Path(spec)
    if spec.startswith(OPENCLIP_PREFIXES) or (path.is_dir() and (path / "open_clip_config.json").is_file()):
        return "openclip"
    if path.is_dir() and (path / "config.json").is_file():
        return "hf"
    if not path.exists() and ":" in spec and _openclip_name(spec) is not None:
        return "openclip"
    return None


def model_name(spec: str) -> str:
    """A short name for results and caches: the file's stem, the folder's name, or an OpenCLIP 'ARCH:TAG'."""
    for prefix in OPENCLIP_PREFIXES:
        if spec.startswith(prefix):
            return Path(spec[len(prefix):].rstrip("/")).name
    path = Path(spec)
    return path.stem if path.exists() else spec


def model_kind(spec: str) -> str:
    """alignclip | alignclip-run | openclip | hf for a model spec, or an error saying what was expected."""
    path = Path(spec)
    foreign = foreign_kind(spec)
    if foreign is not None:
        return foreign
    if path.is_file():
        return "alignclip"
    if path.is_dir():
        if (path / "config.yaml").is_file() or (path / "checkpoints").is_dir() or any(path.glob("step_*")) \
                or (path / "mp_rank_00_model_states.pt").is_file():
            return "alignclip-run"
        raise ValueError(f"{spec}: a folder, but neither an OpenCLIP folder (open_clip_config.json), a Hugging Face "
                         f"CLIP folder (config.json) nor an alignclip run directory (config.yaml, checkpoints/)")
    raise FileNotFoundError(f"{spec}: no such file or folder, and not an OpenCLIP 'local-dir:' / 'hf-hub:' spec "
                            f"or pretrained 'ARCH:TAG' name (expected an alignclip export or run directory, an "
                            f"OpenCLIP or a Hugging Face CLIP folder)")


def _openclip_name(spec: str) -> tuple[str, str] | None:
    """(arch, tag) of a pretrained 'ARCH:TAG' that open_clip knows, else None."""
    import open_clip

    arch, _, tag = spec.partition(":")
    return (arch, tag) if arch in open_clip.list_models() and tag else None


def load(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Callable, ImageTransform]:
    """``alignclip.load``: (model, tokenizer, image transform) of our export or of an OpenCLIP / Hugging Face CLIP;
    no DeepSpeed needed."""
    from alignclip.tokenizer import get_tokenizer

    opened = open_model(path, device)
    config = opened.config
    return opened.model, get_tokenizer(config.model.text.context_length), ImageTransform(config.model.vision.image_size)


def open_model(spec: str | Path, device: str | torch.device = "cpu") -> OpenedModel:
    """The model a spec names (module docstring), on ``device`` in eval mode."""
    spec = str(spec)
    kind = model_kind(spec)
    if kind == "alignclip":
        from alignclip.export import load_model

        model, config = load_model(spec, device)
        return OpenedModel(model, config, "alignclip", spec)
    if kind == "alignclip-run":
        from alignclip.export import checkpoint_model

        model, config, _ = checkpoint_model(spec)
        return OpenedModel(model.to(device), config, "alignclip", spec)
    model_config, state = openclip_source(spec) if kind == "openclip" else hf_source(spec)
    return OpenedModel(_built(model_config, state).to(device).eval(), replace(Config(), model=model_config,
                                                                              name=Path(spec).name or spec), kind,
                       spec)


def _built(model_config: ModelConfig, state: dict[str, torch.Tensor]) -> nn.Module:
    from alignclip.models import build_model

    model = build_model(model_config)
    model.load_state_dict(state, strict=True)
    return model


# --------------------------------------------------------------------------------------------------- OpenCLIP
def _refuse(spec: str, what: str) -> None:
    raise ValueError(f"{spec}: {what}; alignclip's model cannot represent it exactly, so it is not loaded")


def openclip_source(spec: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(our model config, our two-tower state dict) of an OpenCLIP model, built by open_clip itself (so whatever
    open_clip reads - local-dir, hf-hub from the cache, a pretrained tag - reads the same here)."""
    import open_clip

    if spec.startswith(OPENCLIP_PREFIXES):
        name, pretrained = spec, None
    elif Path(spec).is_dir():
        name, pretrained = f"local-dir:{spec}", None
    else:
        name, pretrained = _openclip_name(spec)
    try:
        model = open_clip.create_model(name, pretrained=pretrained, device="cpu")
    except (RuntimeError, OSError) as err:  # a tag whose weights are not cached, a folder without weights
        hint = ""
        if TIMM_TOWER_DIR in str(err):  # an export with the hybrid stem, moved since: its tower is named by path
            hint = (f"; its image tower is named by absolute path in open_clip_config.json (vision_cfg."
                    f"timm_model_name): point it at this folder's {TIMM_TOWER_DIR}, or export again")
        raise FileNotFoundError(f"{spec}: open_clip could not load it ({str(err).splitlines()[0]}){hint}") from None
    pp = getattr(model.visual, "preprocess_cfg", {})  # what open_clip's own preprocess would run
    size = pp.get("size", model.visual.image_size)
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    _check_preprocess(spec, pp.get("mean", CLIP_MEAN), pp.get("std", CLIP_STD), pp.get("interpolation", "bicubic"),
                      pp.get("resize_mode", "shortest") == "shortest" and size == tuple(model.visual.image_size))
    return openclip_model_config(model, spec), _state_of(model, "openclip")


def _check_preprocess(spec: str, mean, std, interpolation: str, resized: bool) -> None:
    """The source's declared preprocessing must be ours (alignclip.data.transforms): CLIP mean/std, bicubic, the
    short side resized to the crop size, then centre-cropped."""
    differs = []
    if any(abs(float(a) - b) > 1e-6 for a, b in zip([*mean, *std], [*CLIP_MEAN, *CLIP_STD])) or len(mean) != 3:
        differs.append(f"mean {list(mean)} / std {list(std)} (ours: CLIP's {list(CLIP_MEAN)} / {list(CLIP_STD)})")
    if interpolation != "bicubic":
        differs.append(f"{interpolation} interpolation (ours: bicubic)")
    if not resized:
        differs.append("another resize than 'short side to the crop size, then centre crop'")
    if differs:
        _refuse(spec, "its image preprocessing has " + "; ".join(differs))


def _one_eps(spec: str, norms: list[nn.Module]) -> float:
    eps = {m.eps for m in norms}
    if len(eps) != 1:
        _refuse(spec, f"its LayerNorms use several eps {sorted(eps)}")
    return eps.pop()


def _act(spec: str, acts: list[nn.Module]) -> str:
    """'gelu' or 'quick_gelu' (model.act) for open_clip's activation modules, one kind for the whole model."""
    from open_clip.transformer import QuickGELU

    kinds = {"gelu" if type(a) is nn.GELU and a.approximate == "none" else
             "quick_gelu" if isinstance(a, QuickGELU) else type(a).__name__ for a in acts}
    if len(kinds) != 1 or not kinds <= {"gelu", "quick_gelu"}:
        _refuse(spec, f"its MLP activations are {sorted(kinds)} (one of exact GELU or QuickGELU is supported)")
    return kinds.pop()


def openclip_model_config(model: nn.Module, spec: str) -> ModelConfig:
    """Our ModelConfig for an open_clip ``CLIP`` module, refusing every feature that ours lacks."""
    import open_clip
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    if type(model) is not open_clip.CLIP:
        _refuse(spec, f"it is an open_clip {type(model).__name__} (only the two-transformer CLIP is supported)")
    visual = model.visual
    if type(visual) is open_clip.timm_model.TimmModel:
        return _with_timm_hybrid_tower(spec, model)
    if type(visual) is not VisionTransformer:
        _refuse(spec, f"its image tower is a {type(visual).__name__}, not a ViT")
    checks = {
        "attentional pooling": visual.attn_pool is not None,
        f"image pooling {visual.pool_type!r}": visual.pool_type != "tok",
        "no pre-norm (no_ln_pre)": isinstance(visual.ln_pre, nn.Identity),
        "no image projection": visual.proj is None,
        **_text_checks(model),
    }
    blocks = [*visual.transformer.resblocks, *model.transformer.resblocks]
    checks["custom or layer-scaled blocks"] = any(type(b) is not ResidualAttentionBlock
                                                  or not isinstance(b.ls_1, nn.Identity) for b in blocks)
    for what, bad in checks.items():
        if bad:
            _refuse(spec, f"it has {what}")
    act = _act(spec, [block.mlp.gelu for block in blocks])
    eps = _one_eps(spec, [m for m in model.modules() if isinstance(m, nn.LayerNorm)])
    size = visual.image_size
    if size[0] != size[1]:
        _refuse(spec, f"its images are not square ({size})")
    width, vb = visual.conv1.out_channels, visual.transformer.resblocks[0]
    return ModelConfig(
        arch="clip", embed_dim=visual.proj.shape[1], norm_eps=eps, act=act,
        vision=VisionConfig(image_size=size[0], patch_size=visual.conv1.kernel_size[0], width=width,
                            layers=len(visual.transformer.resblocks), heads=vb.attn.num_heads,
                            mlp_ratio=vb.mlp.c_fc.out_features / width, stem="patch"),
        text=_openclip_text_config(model))


def _openclip_text_config(model: nn.Module) -> TextConfig:
    """Our TextConfig for an open_clip CLIP's text transformer."""
    width, block = model.token_embedding.embedding_dim, model.transformer.resblocks[0]
    return TextConfig(context_length=model.positional_embedding.shape[0], vocab_size=model.vocab_size, width=width,
                      layers=len(model.transformer.resblocks), heads=block.attn.num_heads,
                      mlp_ratio=block.mlp.c_fc.out_features / width)


def _text_checks(model: nn.Module) -> dict[str, bool]:
    return {f"text pooling {model.text_pool_type!r}": model.text_pool_type != "argmax",
            "no causal text mask": model.attn_mask is None,
            "a logit bias (SigLIP)": getattr(model, "logit_bias", None) is not None,
            "a text projection with bias or none": not isinstance(model.text_projection, nn.Parameter)}


def _with_timm_hybrid_tower(spec: str, model: nn.Module) -> ModelConfig:
    """Our ModelConfig (model.vision.stem=hybrid) for an open_clip CLIP whose image tower is timm's hybrid ViT with
    the ResNet-v2 root alone (how alignclip-export writes the hybrid stem), refusing every other timm tower."""
    from open_clip.transformer import ResidualAttentionBlock
    from timm.layers import GELU, QuickGELU
    from timm.layers.hybrid_embed import HybridEmbed
    from timm.models.vision_transformer import Block, VisionTransformer as TimmViT

    from alignclip.models.stems import HYBRID_CHANNELS, HYBRID_GROUPS, HYBRID_REDUCTION

    visual = model.visual
    trunk, head = visual.trunk, visual.head
    if type(trunk) is not TimmViT or type(trunk.patch_embed) is not HybridEmbed:
        _refuse(spec, f"its image tower is timm's {type(trunk).__name__} (only the hybrid ViT with a ResNet-v2 root "
                      f"is supported)")
    root = list(trunk.patch_embed.backbone.children())
    names = [type(m).__name__ for m in root]
    conv, norm, pool = root if len(root) == 3 else (None, None, None)
    checks = {
        f"a hybrid backbone of {names} (not the ResNet-v2 root: StdConv2dSame, GroupNormAct, MaxPool2dSame)":
            names != ["StdConv2dSame", "GroupNormAct", "MaxPool2dSame"],
        "another ResNet-v2 root than 7x7 stride 2 to 64 channels, 32 groups, ReLU, 3x3 stride-2 pool":
            names == ["StdConv2dSame", "GroupNormAct", "MaxPool2dSame"] and (
                conv.kernel_size, conv.stride, conv.out_channels, conv.eps, norm.num_groups, type(norm.act),
                pool.kernel_size, pool.stride) != ((7, 7), (2, 2), HYBRID_CHANNELS, 1e-8, HYBRID_GROUPS, nn.ReLU,
                                                   (3, 3), (2, 2)),
        "a patch projection with bias": trunk.patch_embed.proj.bias is not None,
        "no class token, or register tokens": not trunk.has_class_token or trunk.num_prefix_tokens != 1,
        "positions without the class token": trunk.no_embed_class,
        "no pre-norm": not isinstance(trunk.norm_pre, nn.LayerNorm),
        f"image pooling {trunk.global_pool!r}": trunk.global_pool != "token" or not isinstance(trunk.fc_norm,
                                                                                               nn.Identity),
        "an image head other than one bias-free linear projection": [n for n, m in head.named_children()
                                                                     if not isinstance(m, nn.Dropout)] != ["proj"]
            or head.proj.bias is not None,
        "custom, layer-scaled or extra-normed blocks": any(
            type(b) is not Block or not all(isinstance(m, nn.Identity) for m in (b.ls1, b.ls2, b.attn.q_norm,
                                                                                 b.attn.norm, b.mlp.norm))
            for b in trunk.blocks)
            or any(type(b) is not ResidualAttentionBlock or not isinstance(b.ls_1, nn.Identity)
                   for b in model.transformer.resblocks),
        **_text_checks(model),
    }
    for what, bad in checks.items():
        if bad:
            _refuse(spec, f"it has {what}")
    image_acts = {"gelu" if type(b.mlp.act) in (GELU, nn.GELU) else "quick_gelu" if type(b.mlp.act) is QuickGELU
                  else type(b.mlp.act).__name__ for b in trunk.blocks}
    act = _act(spec, [block.mlp.gelu for block in model.transformer.resblocks])
    if image_acts != {act}:
        _refuse(spec, f"its image MLPs use {sorted(image_acts)} and its text MLPs {act}")
    eps = _one_eps(spec, [m for m in model.modules() if isinstance(m, nn.LayerNorm)])
    size, patch = trunk.patch_embed.img_size, trunk.patch_embed.proj.kernel_size[0] * HYBRID_REDUCTION
    if size[0] != size[1] or size[0] != trunk.patch_embed.grid_size[0] * patch:
        _refuse(spec, f"its images are not square or not a whole number of patches ({size})")
    width, vb = trunk.embed_dim, trunk.blocks[0]
    return ModelConfig(
        arch="clip", embed_dim=head.proj.out_features, norm_eps=eps, act=act,
        vision=VisionConfig(image_size=size[0], patch_size=patch, width=width, layers=len(trunk.blocks),
                            heads=vb.attn.num_heads, mlp_ratio=vb.mlp.fc1.out_features / width, stem="hybrid"),
        text=_openclip_text_config(model))


def _state_of(model: nn.Module, library: str) -> dict[str, torch.Tensor]:
    from alignclip.models.convert import from_hf, from_openclip

    state = model.state_dict()
    return from_openclip(state) if library == "openclip" else from_hf(state)


# ------------------------------------------------------------------------------------------------ Hugging Face
def hf_source(spec: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(our model config, our two-tower state dict) of a transformers CLIPModel folder."""
    from transformers import CLIPModel

    config = json.loads((Path(spec) / "config.json").read_text())
    if config.get("model_type") != "clip":
        _refuse(spec, f"its config.json says model_type {config.get('model_type')!r}, not a CLIPModel 'clip'")
    stem = config.get("vision_config", {}).get("alignclip_stem")
    if stem is not None:  # one of our stems (an export's modeling_alignclip.py): built by our own copy of that code
        from alignclip.models.hf_remote import AlignCLIPModel as CLIPModel
    try:
        model = CLIPModel.from_pretrained(spec)
    except OSError as err:
        raise FileNotFoundError(f"{spec}: transformers could not load it ({str(err).splitlines()[0]})") from None
    processor = Path(spec) / "preprocessor_config.json"
    if processor.is_file():  # as transformers' CLIPImageProcessor reads it (its defaults for absent keys)
        pp = json.loads(processor.read_text())
        side = model.config.vision_config.image_size
        short = pp.get("size", {"shortest_edge": 224})
        short = short.get("shortest_edge") if isinstance(short, dict) else short
        crop = pp.get("crop_size", {"height": 224, "width": 224})
        crop = (crop.get("height"), crop.get("width")) if isinstance(crop, dict) else (crop, crop)
        _check_preprocess(spec, pp.get("image_mean", CLIP_MEAN), pp.get("image_std", CLIP_STD),
                          "bicubic" if pp.get("resample", 3) == 3 else f"PIL resample {pp.get('resample')}",
                          short == side and crop == (side, side) and pp.get("do_center_crop", True))
    return hf_model_config(model, spec), _state_of(model, "hf")


def hf_model_config(model: nn.Module, spec: str) -> ModelConfig:
    """Our ModelConfig for a ``transformers.CLIPModel``, refusing what ours lacks."""
    from alignclip.models.convert import EOT_ID

    v, t = model.config.vision_config, model.config.text_config
    if v.hidden_act != t.hidden_act or v.hidden_act not in ("gelu", "quick_gelu"):
        _refuse(spec, f"its MLP activations are {v.hidden_act!r} (image) and {t.hidden_act!r} (text); one of "
                      f"'gelu' and 'quick_gelu' is supported")
    if t.eos_token_id not in (2, EOT_ID):  # 2: transformers' legacy argmax pooling; EOT_ID: the largest id, same
        _refuse(spec, f"its text pools at token id {t.eos_token_id}, not at end-of-text ({EOT_ID})")
    eps = _one_eps(spec, [m for m in model.modules() if isinstance(m, nn.LayerNorm)])
    stem, stem_channels = getattr(v, "alignclip_stem", "patch"), 0
    if stem == "conv":
        from alignclip.models.layers import conv_stem_channels

        channels = list(getattr(v, "alignclip_stem_channels", []))
        stem_channels = channels[-1] if channels else 0
        if not channels or conv_stem_channels(v.patch_size, stem_channels) != channels:
            _refuse(spec, f"its conv stem has channels {channels}, which model.vision.stem_channels cannot express")
    return ModelConfig(
        arch="clip", embed_dim=model.config.projection_dim, norm_eps=eps, act=v.hidden_act,
        vision=VisionConfig(image_size=v.image_size, patch_size=v.patch_size, width=v.hidden_size,
                            layers=v.num_hidden_layers, heads=v.num_attention_heads,
                            mlp_ratio=v.intermediate_size / v.hidden_size, stem=stem, stem_channels=stem_channels),
        text=TextConfig(context_length=t.max_position_embeddings, vocab_size=t.vocab_size, width=t.hidden_size,
                        layers=t.num_hidden_layers, heads=t.num_attention_heads,
                        mlp_ratio=t.intermediate_size / t.hidden_size))


# ------------------------------------------------------------------------------------------ model.init_from
SHAPE_KEYS = ("embed_dim", "norm_eps", "act", "vision.image_size", "vision.patch_size", "vision.width", "vision.layers",
              "vision.heads", "vision.mlp_ratio", "vision.stem", "vision.stem_channels", "text.context_length",
              "text.vocab_size", "text.width", "text.layers", "text.heads", "text.mlp_ratio")


def _get(cfg: ModelConfig, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def source_weights(spec: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(model config, state dict) of any model spec, without building anything for an OpenCLIP / HF source."""
    kind = model_kind(spec)
    if kind == "openclip":
        return openclip_source(spec)
    if kind == "hf":
        return hf_source(spec)
    opened = open_model(spec)
    return opened.config.model, opened.model.state_dict()


def init_weights(model: nn.Module, cfg: ModelConfig) -> str:
    """Load ``cfg.init_from``'s weights into ``model`` (built from ``cfg``); returns what was done, in words.

    CLIP from anything: exact (a SharedCLIP source's trunk goes into both towers). SharedCLIP from a two-tower
    source needs both towers of one shape; its one trunk takes the image tower (blocks, final norm, projection),
    exact when the towers are equal (our SharedCLIP exports), otherwise the text embeddings start from the image
    tower's trunk and have to be re-learnt. Raises ConfigError naming ``model.init_from``."""
    from alignclip.models.convert import shared_to_two_towers, two_towers_to_shared

    spec = cfg.init_from
    try:
        source_cfg, state = source_weights(spec)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"model.init_from: {err}") from None
    compared = replace(source_cfg, arch=cfg.arch) if source_cfg.arch != cfg.arch else source_cfg
    if cfg.arch == "sharedclip" and (compared.vision.width, compared.vision.layers, compared.vision.heads,
                                     compared.vision.mlp_ratio) != (compared.text.width, compared.text.layers,
                                                                    compared.text.heads, compared.text.mlp_ratio):
        raise ConfigError(f"model.init_from: {spec} has towers of different shapes (image width "
                          f"{compared.vision.width} x {compared.vision.layers}, text {compared.text.width} x "
                          f"{compared.text.layers}); SharedCLIP shares one trunk, so it can start from it only "
                          f"as model.arch=clip")
    differ = [f"model.{k}={_get(source_cfg, k)}" for k in SHAPE_KEYS if _get(source_cfg, k) != _get(cfg, k)]
    if differ:
        raise ConfigError(f"model.init_from: {spec} has another shape than this config; add the overrides "
                          f"{' '.join(differ)}")
    note = "exact"
    if source_cfg.arch == "sharedclip" and cfg.arch == "clip":
        state = shared_to_two_towers(state)
    elif source_cfg.arch == "clip" and cfg.arch == "sharedclip":
        state, exact = two_towers_to_shared(state)
        if not exact:
            note = ("the shared trunk is the source's image tower: image embeddings equal the source's, text "
                    "embeddings do not until fine-tuning re-learns them")
    model.load_state_dict(state, strict=True)
    done = f"model.init_from: initialised from {spec} ({note})"
    log.info(done)
    return done


def describe_overrides(spec: str) -> list[str]:
    """The ``model.*`` overrides whose config has the shape of the model ``spec`` names."""
    source_cfg, _ = source_weights(spec)
    return [f"model.{k}={_get(source_cfg, k)}" for k in ("arch", *SHAPE_KEYS)] + [f"model.init_from={spec}"]


def main(argv: list[str] | None = None) -> int:
    """``python -m alignclip.interop SPEC``: the overrides that train from that model (model.init_from)."""
    import sys

    from alignclip.errors import run_command

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m alignclip.interop MODEL  (prints the overrides to fine-tune from MODEL)",
              file=sys.stderr)
        return 2
    return run_command("alignclip.interop", lambda: print(" ".join(describe_overrides(args[0]))))


if __name__ == "__main__":
    raise SystemExit(main())
