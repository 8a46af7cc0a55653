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


def require_patch_stem(cfg: ModelConfig) -> None:
    """OpenCLIP's and Hugging Face's ViTs embed patches with one conv; a convolutional stem has no place there."""
    if cfg.vision.stem != "patch":
        raise ExportError(f"this model's image stem is {cfg.vision.stem!r} (model.vision.stem); OpenCLIP and "
                          f"Hugging Face CLIP have only the one-conv patch stem, so it cannot be exported to them. "
                          f"Its safetensors export (alignclip-export, the default format) loads with "
                          f"alignclip.load")


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


def _renamed(name: str, table: dict[str, str]) -> str:
    for ours, theirs in table.items():
        if name == ours or name.startswith(ours + "."):
            return theirs + name[len(ours):]
    raise KeyError(f"no counterpart known for block parameter {name!r}")


def openclip_config(cfg: ModelConfig, eps: float) -> dict:
    """``model_cfg`` of open_clip_config.json: OpenCLIP's CLIP with our shape, activation and eps."""
    v, t = cfg.vision, cfg.text
    return {
        "embed_dim": cfg.embed_dim,
        "quick_gelu": cfg.act == "quick_gelu",
        "vision_cfg": {"image_size": v.image_size, "patch_size": v.patch_size, "width": v.width, "layers": v.layers,
                       "head_width": v.width // v.heads, "mlp_ratio": v.mlp_ratio, "norm_kwargs": {"eps": eps}},
        "text_cfg": {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width,
                     "heads": t.heads, "layers": t.layers, "mlp_ratio": t.mlp_ratio, "norm_kwargs": {"eps": eps}},
    }


# Every parameter outside the blocks: ours ({image} / {text}: that tower's trunk), OpenCLIP's, HF's. OpenCLIP keeps
# the projections as x @ W ([in, out]), so they are transposed for it; both store logit_scale as a 0-d tensor.
_OUTER = [
    ("image_stem.patch_embed.weight", "visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight"),
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


def _outer(state: dict[str, torch.Tensor], cfg: ModelConfig, library: int) -> dict[str, torch.Tensor]:
    """The non-block parameters under OpenCLIP's (library 0) or HF's (1) names."""
    image, text = _trunk_prefixes(cfg)
    out = {}
    for ours, *theirs in _OUTER:
        value = state[ours.format(image=image, text=text)]
        if ours == "logit_scale":
            value = value.reshape(())
        elif library == 0 and ours.endswith("proj.weight"):
            value = value.t()
        out[theirs[library]] = value
    return out


def to_openclip(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> OpenCLIP ``CLIP``'s (every key it has, none it lacks)."""
    out = _outer(state, cfg, library=0)
    for trunk, tower in zip(_trunk_prefixes(cfg), ("visual.transformer", "transformer")):
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
                          "layer_norm_eps": eps, "projection_dim": cfg.embed_dim},
    }


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
def _from_outer(state: dict[str, torch.Tensor], library: int) -> dict[str, torch.Tensor]:
    """The inverse of ``_outer`` into a two-tower (CLIP) state dict."""
    out = {}
    for ours, *theirs in _OUTER:
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
    """OpenCLIP ``CLIP``'s state dict -> ours as a two-tower CLIP (``to_openclip``'s inverse)."""
    out = _from_outer(state, library=0)
    back = {theirs: ours for ours, theirs in _OPENCLIP_BLOCK.items()}
    for tower, trunk in (("visual.transformer", "image_trunk"), ("transformer", "text_trunk")):
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
