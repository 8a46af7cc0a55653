"""Our weights in OpenCLIP's and Hugging Face's CLIP layouts (the export formats of alignclip.export), and back
(``from_openclip`` / ``from_hf``, which alignclip.interop reads foreign models with).

Both libraries build the same pre-norm ViT as ours: a bias-free patch conv, class token, learned positions, a
pre-norm ``ln_pre`` on images only, blocks of (LN, attention with one fused or three separate q/k/v projections
with biases, LN, MLP with exact GELU or QuickGELU: ``model.act``), a final LayerNorm, pooling at the class token
(images) or at the first end-of-text token, which is the row's largest id (text, causal mask), and a bias-free
projection. What differs is
names and layout: OpenCLIP's projections are ``x @ W`` ([in, out], ours nn.Linear [out, in]); HF splits the fused
qkv into q/k/v and stores positions as an nn.Embedding. SharedCLIP's one trunk is written into both towers.
One LayerNorm eps for the whole model (``model.norm_eps``) maps onto OpenCLIP's ``norm_kwargs`` and HF's
``layer_norm_eps``; a model without one (checkpoints saved before that key) cannot be expressed exactly.

Other image stems (alignclip.models.stems): HF takes them in place of its patch conv under the same name, through
the modeling file an export ships (alignclip.models.hf_remote). OpenCLIP takes the hybrid stem as its timm tower:
timm's hybrid ViT at our shape, whose modules are ours one for one (``_TIMM_PREFIXES``), with timm's LayerNorm eps
1e-6; it has no place for the conv stem (``check_exportable``).
"""

from __future__ import annotations

import math

import torch

from alignclip.config import ModelConfig

# OpenCLIP block names for ours (timm Block); the fused qkv keeps its [3 width, width] q-k-v row order.
_OPENCLIP_BLOCK = {"norm1": "ln_1", "attn.qkv.weight": "attn.in_proj_weight", "attn.qkv.bias": "attn.in_proj_bias",
                   "attn.proj": "attn.out_proj", "norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_HF_BLOCK = {"norm1": "layer_norm1", "attn.proj": "self_attn.out_proj", "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1",
             "mlp.fc2": "mlp.fc2"}
SOT_ID, EOT_ID = 49406, 49407


class ExportError(ValueError):
    """A model that the requested format cannot represent exactly."""


TIMM_EPS = 1e-6  # timm's ViT builds its LayerNorms with eps 1e-6 and OpenCLIP's timm tower cannot change it
TIMM_HYBRID_ARCH = "vit_tiny_r_s16_p8_224"  # timm's hybrid ViT whose stem is the ResNet-v2 root alone


def check_exportable(cfg: ModelConfig, library: str) -> None:
    """Raise ExportError unless ``library`` ('openclip' | 'hf') can hold ``cfg``'s image stem exactly.

    The patch stem is both libraries' own ViT. Hugging Face takes the conv and hybrid stems through
    ``trust_remote_code`` (alignclip.models.hf_remote). OpenCLIP builds other stems only through timm: the hybrid
    stem is timm's hybrid ViT (whose LayerNorms have eps 1e-6), and timm has no conv stem with per-image GroupNorm.
    """
    stem = cfg.vision.stem
    if library != "openclip" or stem == "patch":
        return
    if stem == "conv":
        raise ExportError("this model's image stem is 'conv' (model.vision.stem): OpenCLIP runs non-patch stems "
                          "through timm, which has no conv stem with per-image GroupNorm. Export it with --format hf "
                          "(it loads with trust_remote_code), or train with model.vision.stem=hybrid, which both "
                          "libraries load")
    if cfg.norm_eps != TIMM_EPS:
        raise ExportError(f"this model's LayerNorms have eps {cfg.norm_eps} (model.norm_eps); OpenCLIP runs its "
                          f"hybrid stem (model.vision.stem=hybrid) through timm's ViT, whose eps is {TIMM_EPS}. "
                          f"Export it with --format hf, or train with model.norm_eps={TIMM_EPS}")


def exact_norm_eps(cfg: ModelConfig) -> float:
    if cfg.norm_eps is None:
        raise ExportError("this model uses two LayerNorm eps (1e-6 in the blocks, 1e-5 elsewhere: a checkpoint "
                          "saved before model.norm_eps existed); OpenCLIP and Hugging Face CLIP take one eps per "
                          "model, so their embeddings would differ by ~1e-3. Retrain with model.norm_eps set, or "
                          "pass allow_inexact=True (--allow-inexact) to export with eps 1e-5 anyway")
    return cfg.norm_eps


def _trunk_prefixes(cfg: ModelConfig) -> tuple[str, str]:
    return ("trunk", "trunk") if cfg.arch == "sharedclip" else ("image_trunk", "text_trunk")


def _blocks(state: dict[str, torch.Tensor], trunk: str) -> dict[int, dict[str, torch.Tensor]]:
    """trunk's block parameters as {block index: {name inside the block: tensor}}."""
    out: dict[int, dict[str, torch.Tensor]] = {}
    prefix = f"{trunk}.blocks."
    for key, value in state.items():
        if key.startswith(prefix):
            index, _, rest = key[len(prefix):].partition(".")
            out.setdefault(int(index), {})[rest] = value
    return out


def _renamed_prefix(state: dict[str, torch.Tensor], prefix: str, to: str) -> dict[str, torch.Tensor]:
    """The entries of ``state`` under ``prefix``, under ``to`` instead."""
    return {to + k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _renamed(name: str, table: dict[str, str]) -> str:
    for ours, theirs in table.items():
        if name == ours or name.startswith(ours + "."):
            return theirs + name[len(ours):]
    raise KeyError(f"no counterpart known for block parameter {name!r}")


def openclip_config(cfg: ModelConfig, eps: float, timm_tower: str = "") -> dict:
    """``model_cfg`` of open_clip_config.json: OpenCLIP's CLIP with our shape, activation and eps. A hybrid stem
    makes the image tower OpenCLIP's timm tower, built from ``timm_tower`` (a folder holding ``timm_config``)."""
    v, t = cfg.vision, cfg.text
    if cfg.vision.stem == "hybrid":
        vision = {"image_size": v.image_size, "timm_model_name": f"local-dir:{timm_tower}",
                  "timm_model_pretrained": False, "timm_pool": "token", "timm_proj": "linear",
                  "timm_proj_bias": False}
    else:
        vision = {"image_size": v.image_size, "patch_size": v.patch_size, "width": v.width, "layers": v.layers,
                  "head_width": v.width // v.heads, "mlp_ratio": v.mlp_ratio, "norm_kwargs": {"eps": eps}}
    return {
        "embed_dim": cfg.embed_dim,
        "quick_gelu": cfg.act == "quick_gelu",
        "vision_cfg": vision,
        "text_cfg": {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width,
                     "heads": t.heads, "layers": t.layers, "mlp_ratio": t.mlp_ratio, "norm_kwargs": {"eps": eps}},
    }


def timm_config(cfg: ModelConfig, mean: tuple[float, ...], std: tuple[float, ...]) -> dict:
    """The config.json of a timm ``local-dir:`` model: timm's hybrid ViT (TIMM_HYBRID_ARCH) at our image tower's
    shape, its root alone before a (patch / 4)-px patch conv, with CLIP's pre-norm, class-token pooling, no head."""
    from alignclip.models.stems import HYBRID_REDUCTION

    v = cfg.vision
    return {"architecture": TIMM_HYBRID_ARCH, "num_classes": 0,
            "model_args": {"img_size": v.image_size, "patch_size": v.patch_size // HYBRID_REDUCTION,
                           "embed_dim": v.width, "depth": v.layers, "num_heads": v.heads, "mlp_ratio": v.mlp_ratio,
                           "qkv_bias": True, "class_token": True, "pre_norm": True, "global_pool": "token",
                           "act_layer": cfg.act},
            "pretrained_cfg": {"input_size": [3, v.image_size, v.image_size], "interpolation": "bicubic",
                               "crop_pct": 1.0, "crop_mode": "center", "mean": list(mean),
                               "std": list(std), "num_classes": 0, "fixed_input_size": True}}


# Our image tower in OpenCLIP's timm tower (``visual.trunk`` is timm's VisionTransformer, whose blocks are the timm
# Block ours are; ``visual.head.proj`` an nn.Linear): prefix renames, then the two tokens timm keeps as [1, n, w].
_TIMM_PREFIXES = [("image_stem.patch_embed.", "visual.trunk.patch_embed."),
                  ("image_stem.norm_pre.", "visual.trunk.norm_pre."),
                  ("{image}.blocks.", "visual.trunk.blocks."), ("{image}.norm.", "visual.trunk.norm."),
                  ("{image}.proj.", "visual.head.proj.")]
_TIMM_TOKENS = [("image_stem.class_token", "visual.trunk.cls_token"),
                ("image_stem.pos_embed", "visual.trunk.pos_embed")]


def _to_timm_tower(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    image, _ = _trunk_prefixes(cfg)
    out = {}
    for ours, theirs in _TIMM_PREFIXES:
        out.update(_renamed_prefix(state, ours.format(image=image), theirs))
    for ours, theirs in _TIMM_TOKENS:
        out[theirs] = state[ours].reshape(1, -1, state[ours].shape[-1])
    return out


def _from_timm_tower(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for ours, theirs in _TIMM_PREFIXES:
        out.update(_renamed_prefix(state, theirs, ours.format(image="image_trunk")))
    for ours, theirs in _TIMM_TOKENS:
        out[ours] = state[theirs].reshape(-1, state[theirs].shape[-1]) if ours.endswith("pos_embed") \
            else state[theirs].reshape(-1)
    return out


# The image stem's parameters, by prefix: ours, OpenCLIP's ViT (patch stem), HF's (any stem: hf_remote puts ours in
# place of the patch conv under the same name).
_STEM = ("image_stem.patch_embed.", "visual.conv1.", "vision_model.embeddings.patch_embedding.")
# Every other parameter outside the blocks: ours ({image} / {text}: that tower's trunk), OpenCLIP's, HF's. OpenCLIP
# keeps the projections as x @ W ([in, out]), so they are transposed for it; both store logit_scale as a 0-d tensor.
_OUTER = [
    ("image_stem.class_token", "visual.class_embedding", "vision_model.embeddings.class_embedding"),
    ("image_stem.pos_embed", "visual.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
    ("image_stem.norm_pre.weight", "visual.ln_pre.weight", "vision_model.pre_layrnorm.weight"),  # sic: HF's name
    ("image_stem.norm_pre.bias", "visual.ln_pre.bias", "vision_model.pre_layrnorm.bias"),
    ("{image}.norm.weight", "visual.ln_post.weight", "vision_model.post_layernorm.weight"),
    ("{image}.norm.bias", "visual.ln_post.bias", "vision_model.post_layernorm.bias"),
    ("{image}.proj.weight", "visual.proj", "visual_projection.weight"),
    ("text_stem.token_embed.weight", "token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
    ("text_stem.pos_embed", "positional_embedding", "text_model.embeddings.position_embedding.weight"),
    ("{text}.norm.weight", "ln_final.weight", "text_model.final_layer_norm.weight"),
    ("{text}.norm.bias", "ln_final.bias", "text_model.final_layer_norm.bias"),
    ("{text}.proj.weight", "text_projection", "text_projection.weight"),
    ("logit_scale", "logit_scale", "logit_scale"),
]


def _is_image_row(ours: str) -> bool:
    return ours.startswith(("image_stem.", "{image}."))


def _outer(state: dict[str, torch.Tensor], cfg: ModelConfig, library: int, image: bool = True
           ) -> dict[str, torch.Tensor]:
    """The non-block parameters under OpenCLIP's (library 0) or HF's (1) names (without the image tower's:
    ``image`` False)."""
    image_trunk, text = _trunk_prefixes(cfg)
    out = _renamed_prefix(state, _STEM[0], _STEM[1 + library]) if image else {}
    for ours, *theirs in _OUTER:
        if not image and _is_image_row(ours):
            continue
        value = state[ours.format(image=image_trunk, text=text)]
        if ours == "logit_scale":
            value = value.reshape(())
        elif library == 0 and ours.endswith("proj.weight"):
            value = value.t()
        out[theirs[library]] = value
    return out


def to_openclip(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> OpenCLIP ``CLIP``'s (every key it has, none it lacks)."""
    timm = cfg.vision.stem == "hybrid"  # the image tower is timm's
    out = _outer(state, cfg, library=0, image=not timm)
    towers = list(zip(_trunk_prefixes(cfg), ("visual.transformer", "transformer")))
    if timm:
        out.update(_to_timm_tower(state, cfg))
        towers = towers[1:]
    for trunk, tower in towers:
        for index, params in _blocks(state, trunk).items():
            for name, value in params.items():
                out[f"{tower}.resblocks.{index}.{_renamed(name, _OPENCLIP_BLOCK)}"] = value
    return {k: v.contiguous().clone() for k, v in out.items()}


def hf_config_kwargs(cfg: ModelConfig, eps: float) -> dict:
    """Keyword arguments of ``transformers.CLIPConfig`` for our shape and activation (eos pooling at id 49407)."""
    v, t = cfg.vision, cfg.text
    return {
        "projection_dim": cfg.embed_dim,
        "logit_scale_init_value": math.log(1.0 / cfg.init_temperature),
        "text_config": {"vocab_size": t.vocab_size, "hidden_size": t.width,
                        "intermediate_size": int(t.width * t.mlp_ratio), "num_hidden_layers": t.layers,
                        "num_attention_heads": t.heads, "max_position_embeddings": t.context_length,
                        "hidden_act": cfg.act, "layer_norm_eps": eps, "projection_dim": cfg.embed_dim,
                        "bos_token_id": SOT_ID, "eos_token_id": EOT_ID, "pad_token_id": EOT_ID},
        "vision_config": {"hidden_size": v.width, "intermediate_size": int(v.width * v.mlp_ratio),
                          "num_hidden_layers": v.layers, "num_attention_heads": v.heads, "image_size": v.image_size,
                          "patch_size": v.patch_size, "num_channels": 3, "hidden_act": cfg.act,
                          "layer_norm_eps": eps, "projection_dim": cfg.embed_dim, **hf_stem_keys(cfg)},
    }


HF_REMOTE_CLASS = "modeling_alignclip.AlignCLIPModel"


def hf_stem_keys(cfg: ModelConfig) -> dict:
    """vision_config keys that make alignclip.models.hf_remote put our stem in place of the patch conv (none for
    the patch stem, which is CLIP's own)."""
    from alignclip.models.layers import conv_stem_channels

    v = cfg.vision
    if v.stem == "patch":
        return {}
    keys = {"alignclip_stem": v.stem}
    if v.stem == "conv":
        keys["alignclip_stem_channels"] = conv_stem_channels(v.patch_size, v.stem_channels or v.width)
    return keys


def to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> ``transformers.CLIPModel``'s."""
    out = _outer(state, cfg, library=1)
    for trunk, tower in zip(_trunk_prefixes(cfg), ("vision_model", "text_model")):
        for index, params in _blocks(state, trunk).items():
            prefix = f"{tower}.encoder.layers.{index}"
            for name, value in params.items():
                if name.startswith("attn.qkv."):  # fused [q; k; v] rows -> three projections
                    kind = name.rsplit(".", 1)[1]
                    for part, chunk in zip("qkv", value.chunk(3, dim=0)):
                        out[f"{prefix}.self_attn.{part}_proj.{kind}"] = chunk
                else:
                    out[f"{prefix}.{_renamed(name, _HF_BLOCK)}"] = value
    return {k: v.contiguous().clone() for k, v in out.items()}


# ------------------------------------------------------------------------------ their layouts -> ours (two towers)
def _from_outer(state: dict[str, torch.Tensor], library: int, image: bool = True) -> dict[str, torch.Tensor]:
    """The inverse of ``_outer`` into a two-tower (CLIP) state dict (without the image tower's rows: ``image``
    False)."""
    out = _renamed_prefix(state, _STEM[1 + library], _STEM[0]) if image else {}
    for ours, *theirs in _OUTER:
        if not image and _is_image_row(ours):
            continue
        value = state[theirs[library]]
        if ours == "logit_scale":
            value = value.reshape(1)
        elif library == 0 and ours.endswith("proj.weight"):
            value = value.t()
        out[ours.format(image="image_trunk", text="text_trunk")] = value
    return out


def _tower_blocks(state: dict[str, torch.Tensor], prefix: str) -> dict[int, dict[str, torch.Tensor]]:
    """The block parameters under ``prefix`` (e.g. 'transformer.resblocks.') as {index: {name: tensor}}."""
    out: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key.startswith(prefix):
            index, _, rest = key[len(prefix):].partition(".")
            out.setdefault(int(index), {})[rest] = value
    return out


def from_openclip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP ``CLIP``'s state dict -> ours as a two-tower CLIP (``to_openclip``'s inverse; a timm image tower is
    the hybrid stem's)."""
    timm = "visual.trunk.cls_token" in state
    out = _from_outer(state, library=0, image=not timm)
    towers = [("transformer", "text_trunk")]
    if timm:
        out.update(_from_timm_tower(state))
    else:
        towers.append(("visual.transformer", "image_trunk"))
    back = {theirs: ours for ours, theirs in _OPENCLIP_BLOCK.items()}
    for tower, trunk in towers:
        for index, params in _tower_blocks(state, f"{tower}.resblocks.").items():
            for name, value in params.items():
                out[f"{trunk}.blocks.{index}.{_renamed(name, back)}"] = value
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}


def from_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``transformers.CLIPModel``'s state dict -> ours as a two-tower CLIP (``to_hf``'s inverse: q, k, v fused)."""
    out = _from_outer(state, library=1)
    back = {theirs: ours for ours, theirs in _HF_BLOCK.items()}
    for tower, trunk in (("vision_model", "image_trunk"), ("text_model", "text_trunk")):
        for index, params in _tower_blocks(state, f"{tower}.encoder.layers.").items():
            prefix = f"{trunk}.blocks.{index}"
            for kind in ("weight", "bias"):
                out[f"{prefix}.attn.qkv.{kind}"] = torch.cat([params.pop(f"self_attn.{p}_proj.{kind}")
                                                              for p in "qkv"])
            for name, value in params.items():
                out[f"{prefix}.{_renamed(name, back)}"] = value
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}


def two_towers_to_shared(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    """A two-tower state dict -> SharedCLIP's (one ``trunk``: the image tower's blocks, final norm and projection)
    and whether that is exact (the text tower held the same weights, as in our SharedCLIP exports)."""
    out, exact = {}, True
    for key, value in state.items():
        if key.startswith("image_trunk."):
            name = key.removeprefix("image_trunk.")
            twin = state.get(f"text_trunk.{name}")
            exact = exact and twin is not None and torch.equal(twin, value)
            out[f"trunk.{name}"] = value
        elif not key.startswith("text_trunk."):
            out[key] = value
    return out, exact


def shared_to_two_towers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SharedCLIP's state dict -> a two-tower one holding the shared trunk in both towers (exact)."""
    out = {}
    for key, value in state.items():
        if key.startswith("trunk."):
            name = key.removeprefix("trunk.")
            out[f"image_trunk.{name}"], out[f"text_trunk.{name}"] = value, value.clone()
        else:
            out[key] = value
    return out
