"""The FLOP model of a training step, per sample, from the config alone: what MFU divides by.

Convention (the one MFU is defined with, PaLM appendix B): a multiply-add is 2 FLOPs; only matrix products count
(linear layers, the patch-embedding convolution, attention's two batched products, the loss's similarity GEMMs);
elementwise work (norms, GELU, softmax, bias adds) is left out, as ``torch.utils.flop_counter.FlopCounterMode``
leaves it out. Backward = 2x forward for every product whose both operands need a gradient (input gradient +
weight gradient), 1x for the patch embedding (the images need no gradient). Attention is counted in full (the
causal text mask is not halved, as FlopCounterMode does). Recomputation is NOT model FLOPs: flash attention's
backward recomputes Q K^T (FlopCounterMode counts that: 2.5x the attention forward where we count 2x) and
activation checkpointing re-runs the blocks' forward; both are reported apart as ``recompute``. MFU excludes them
(a hardware-FLOP utilisation, HFU, would include them).

Per sample, with image tokens T_i = (image / patch)^2 + 1, text tokens T_t = context length, width w, MLP width m,
L layers, joint width e, global batch N, embedding width d = e, sentence-embedding width k:

    block linear layers     2 T w (4 w + 2 m) L       (qkv 3w^2, out-proj w^2, fc1 w m, fc2 m w)
    attention               4 T^2 w L                 (Q K^T and P V)
    with model.pooled_last_block (the default) the last block runs at the pooled row only: its keys and values
    still cost 4 T w^2, its query, out-proj and MLP 2 w (2 w + 2 m), its attention 4 T w
    patch embedding         2 (p^2 3) w (T_i - 1); a convolutional stem (model.vision.stem: conv): per 3x3 stride-2
                            conv 2 (9 c_in c_out) s^2 at its output side s, then the 1x1 projection 2 c w (T_i - 1);
                            the hybrid stem (model.vision.stem: hybrid): its 7x7 conv 2 (49 3 64) (image / 2)^2,
                            then the (p / 4)^2 patch conv 2 ((p / 4)^2 64) w (T_i - 1)
    head (pooled token)     2 w e                     (the projection; the final norm is elementwise)
    loss, dense             cross-modal 4 N d fwd / 8 N d bwd; IMSep per side 2 N d + 2 N k fwd / 4 N d bwd;
                            uniformity 4 N d / 8 N d, cross-uniformity 2 N d / 4 N d (alignment is elementwise)

CLIP and SharedCLIP cost the same per sample (sharing weights changes parameters, not work). The loss's model
FLOPs are the dense path's; the fused paths recompute tiles in the backward (``impl`` below gives their hardware
FLOPs, the table of docs/performance.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from alignclip.config import Config, LossConfig, ModelConfig

# Sentence-embedding widths of the encoders we ship configs for; others are 768 unless given.
SEMANTIC_DIMS = {"all-minilm-l6-v2": 384, "all-mpnet-base-v2": 768}


@dataclass(frozen=True)
class Part:
    """One component's FLOPs per sample (forward, backward)."""

    name: str
    forward: float
    backward: float

    @property
    def total(self) -> float:
        return self.forward + self.backward


@dataclass(frozen=True)
class StepFlops:
    """The FLOPs of one training step per sample, by component; ``recompute`` is the hardware work beyond the
    model FLOPs (flash attention's score recompute, activation checkpointing's second forward)."""

    parts: tuple[Part, ...]
    recompute: float = 0.0
    notes: dict = field(default_factory=dict)

    @property
    def forward(self) -> float:
        return sum(p.forward for p in self.parts)

    @property
    def backward(self) -> float:
        return sum(p.backward for p in self.parts)

    @property
    def total(self) -> float:
        """Model FLOPs per sample of one training step: what MFU counts."""
        return self.forward + self.backward

    @property
    def hardware_total(self) -> float:
        return self.total + self.recompute

    def by_prefix(self, prefix: str) -> Part:
        chosen = [p for p in self.parts if p.name.startswith(prefix)]
        return Part(prefix, sum(p.forward for p in chosen), sum(p.backward for p in chosen))

    def table(self) -> str:
        """A plain-text table in GFLOP per sample."""
        rows = [f"{'component':<26} {'fwd GFLOP':>10} {'bwd GFLOP':>10} {'step GFLOP':>11}"]
        for p in (*self.parts, Part("total (model FLOPs)", self.forward, self.backward)):
            rows.append(f"{p.name:<26} {p.forward / 1e9:>10.4g} {p.backward / 1e9:>10.4g} {p.total / 1e9:>11.4g}")
        if self.recompute:
            rows.append(f"{'+ recompute (hardware)':<26} {'':>10} {self.recompute / 1e9:>10.4g} "
                        f"{self.hardware_total / 1e9:>11.4g}")
        return "\n".join(rows)


# ------------------------------------------------------------------------------------------------ model
def block_linear_flops(tokens: int, width: int, mlp_ratio: float, layers: int) -> float:
    """Forward FLOPs of the blocks' four linear layers for one sample of ``tokens`` tokens."""
    mlp = int(width * mlp_ratio)  # timm's Mlp: hidden_features = int(width * mlp_ratio)
    return 2.0 * tokens * width * (4 * width + 2 * mlp) * layers


def attention_flops(tokens: int, width: int, layers: int) -> float:
    """Forward FLOPs of Q K^T and P V (all heads together: heads x head_dim = width)."""
    return 4.0 * tokens * tokens * width * layers


def image_tokens(model: ModelConfig) -> int:
    return (model.vision.image_size // model.vision.patch_size) ** 2 + 1


def stem_part(v, patches: int) -> Part:
    """The image stem's products: the patch conv (backward: its weight gradient only, images need none), the
    convolutional stem's 3x3 stride-2 convs and 1x1 projection, or the hybrid stem's 7x7 conv and patch conv
    (backward 2x but for the first conv's 1x)."""
    if v.stem == "patch":
        patch = 2.0 * (v.patch_size ** 2 * 3) * v.width * patches
        return Part("image/patch_embed", patch, patch)
    if v.stem == "hybrid":
        from alignclip.models.stems import HYBRID_CHANNELS, HYBRID_REDUCTION

        side = -(-v.image_size // 2)  # "same" padding, stride 2
        root = 2.0 * 49 * 3 * HYBRID_CHANNELS * side * side
        project = 2.0 * (v.patch_size // HYBRID_REDUCTION) ** 2 * HYBRID_CHANNELS * v.width * patches
        return Part("image/hybrid_stem", root + project, root + 2 * project)
    from alignclip.models.layers import conv_stem_channels

    channels, side = conv_stem_channels(v.patch_size, v.stem_channels or v.width), v.image_size
    forward = backward = 0.0
    for i, (c_in, c_out) in enumerate(zip(channels, channels[1:])):
        side = (side + 1) // 2  # padding 1, stride 2
        conv = 2.0 * 9 * c_in * c_out * side * side
        forward, backward = forward + conv, backward + (conv if i == 0 else 2 * conv)
    project = 2.0 * channels[-1] * v.width * patches
    return Part("image/conv_stem", forward + project, backward + 2 * project)


def model_parts(model: ModelConfig) -> list[Part]:
    """Forward / backward FLOPs per sample of the two towers (or the shared trunk run on both modalities)."""
    v, t, e = model.vision, model.text, model.embed_dim
    trunk = "trunk" if model.arch == "sharedclip" else "tower"
    ti, tt = image_tokens(model), t.context_length
    parts = [stem_part(v, ti - 1)]
    for modality, cfg, tokens in (("image", v, ti), ("text", t, tt)):
        linear = block_linear_flops(tokens, cfg.width, cfg.mlp_ratio, cfg.layers)
        attention = attention_flops(tokens, cfg.width, cfg.layers)
        if model.pooled_last_block and cfg.layers > 0:  # the last block: keys/values at T rows, the rest at one
            w, m = cfg.width, int(cfg.width * cfg.mlp_ratio)
            linear += 4.0 * tokens * w * w + 2.0 * w * (2 * w + 2 * m) - block_linear_flops(tokens, w, cfg.mlp_ratio, 1)
            attention += 4.0 * tokens * w - attention_flops(tokens, w, 1)
        head = 2.0 * cfg.width * e
        parts += [Part(f"{modality}/{trunk}.linear", linear, 2 * linear),
                  Part(f"{modality}/{trunk}.attention", attention, 2 * attention),
                  Part(f"{modality}/head", head, 2 * head)]
    return parts


def recompute_flops(model: ModelConfig, sdpa: bool = True) -> float:
    """Hardware FLOPs beyond the model FLOPs, per sample: a flash-attention backward recomputes Q K^T (half an
    attention forward; torch's FlopCounterMode counts it), and activation checkpointing re-runs every block's
    forward in the backward."""
    blocks = [p for p in model_parts(model) if ".linear" in p.name or ".attention" in p.name]
    flash = 0.5 * sum(p.forward for p in blocks if ".attention" in p.name) if sdpa else 0.0
    checkpointing = sum(p.forward for p in blocks) if model.grad_checkpointing else 0.0
    return flash + checkpointing


def activation_bytes_per_sample(model: ModelConfig, bytes_per_value: int = 2) -> float:
    """Activations the backward keeps, per sample: 34 bytes x width per token and layer in 16-bit with a fused
    attention that stores no T x T matrix (Korthikanti et al. 2022, eq. 1 without its 5 a s / h term)."""
    v, t = model.vision, model.text
    per_value = 34 * bytes_per_value / 2
    return per_value * (v.width * image_tokens(model) * v.layers + t.width * t.context_length * t.layers)


# ------------------------------------------------------------------------------------------------- loss
# Hardware FLOPs of the fused paths in units of the dense path's GEMMs (see docs/performance.md):
# per matrix (cross-modal pair, IMSep side): (forward GEMMs, backward GEMMs incl. recompute), each GEMM being
# 2 N d (features) or 2 N k (sentence similarity, only forward-shaped: no gradient flows into E_s).
_LOSS_IMPLS = {
    # impl: (cross-modal fwd, bwd), (IMSep fwd d, bwd d, fwd k, bwd k) in GEMMs of 2 N x width
    "dense": ((2, 4), (1, 2, 1, 0)),
    "chunked": ((2, 6), (1, 3, 1, 1)),  # rows path (multi-rank): one recompute per matrix
    "chunked_single": ((1, 3), (0.5, 1.5, 0.5, 0.5)),  # one process: paired CLIP tile, symmetric IMSep walk
    "triton": ((2, 8), (1, 4, 1, 2)),  # two recomputes in the backward (rows and columns kernels)
}


def encoder_width(model: str) -> int:
    """The output width of a sentence-transformers model folder, from its module configs (no weights loaded):
    the last Dense layer's out_features, else the Pooling layer's word_embedding_dimension; 0 when unknown."""
    from alignclip.semantic import resolve_model  # sentence-transformers is not imported by it

    try:
        folder = Path(resolve_model(model))
        modules = json.loads((folder / "modules.json").read_text())
    except (ImportError, OSError, ValueError):
        return 0
    width = 0
    for module in modules:
        path = folder / module.get("path", "") / "config.json"
        kind = module.get("type", "")
        try:
            if kind.endswith("Pooling"):
                width = int(json.loads(path.read_text())["word_embedding_dimension"])
            elif kind.endswith("Dense"):
                width = int(json.loads(path.read_text())["out_features"])
        except (OSError, ValueError, KeyError):
            return 0
    return width


def semantic_dim_of(loss: LossConfig) -> int:
    """E_s's width for ``loss.semantic_model``: read from the encoder's files (``encoder_width``); the table of known
    names only when they are not on this machine (a hub name not downloaded yet), then 768."""
    width = encoder_width(loss.semantic_model)
    if width:
        return width
    name = loss.semantic_model.lower().rstrip("/")
    for key, dim in SEMANTIC_DIMS.items():
        if name.endswith(key):
            return dim
    return 768


def loss_parts(loss: LossConfig, global_batch: int, embed_dim: int, semantic_dim: int | None = None,
               impl: str = "dense") -> list[Part]:
    """FLOPs per sample of the objective's GEMMs; every rank's rows meet all ``global_batch`` columns, so the
    per-sample cost is the same on one device or many. ``impl="dense"`` gives the model FLOPs."""
    if impl not in _LOSS_IMPLS:
        raise ValueError(f"impl must be one of {list(_LOSS_IMPLS)}, got {impl!r}")
    n, d = float(global_batch), float(embed_dim)
    k = float(semantic_dim if semantic_dim is not None else semantic_dim_of(loss))
    (cm_f, cm_b), (im_fd, im_bd, im_fk, im_bk) = _LOSS_IMPLS[impl]
    gemm_d, gemm_k = 2 * n * d, 2 * n * k
    parts = []
    if loss.clip_weight or loss.crsep_weight:
        parts.append(Part("loss/cross_modal", cm_f * gemm_d, cm_b * gemm_d))
    if loss.imsep_weight:
        sides = 2 if loss.imsep_sides == "both" else 1
        rescale = 1.0 if loss.imsep_rescale else 0.0
        parts.append(Part("loss/imsep", sides * (im_fd * gemm_d + rescale * im_fk * gemm_k),
                          sides * (im_bd * gemm_d + rescale * im_bk * gemm_k)))
    if loss.uniform_weight:
        parts.append(Part("loss/uniform", 2 * gemm_d, 4 * gemm_d))
    if loss.xuniform_weight:
        parts.append(Part("loss/xuniform", gemm_d, 2 * gemm_d))
    return parts


# ------------------------------------------------------------------------------------------------- step
def step_flops(config: Config, global_batch: int | None = None, semantic_dim: int | None = None,
               loss_impl: str = "dense") -> StepFlops:
    """Model FLOPs per sample of one training step of ``config`` (global batch: the config's unless given)."""
    batch = global_batch if global_batch is not None else config.train.global_batch_size
    parts = model_parts(config.model) + loss_parts(config.loss, batch, config.model.embed_dim, semantic_dim,
                                                   loss_impl)
    return StepFlops(tuple(parts), recompute_flops(config.model, config.fast_path.sdpa), {"global_batch": batch})


def counted_flops(fn, *args, **kwargs) -> tuple[float, object]:
    """FLOPs that torch's FlopCounterMode sees while ``fn`` runs, with the CPU flash-attention ops added (torch
    registers formulas for the CUDA SDPA kernels only, so on CPU attention would count 0). Returns (flops, result)."""
    import torch
    from torch.utils import flop_counter as fc

    def forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_backward_flop_count(grad_out, query, key, value)

    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = forward
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = backward
    with fc.FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        result = fn(*args, **kwargs)
    return float(counter.get_total_flops()), result


def main(argv: list[str] | None = None) -> int:
    """``python -m alignclip.training.flops CONFIG [key=value ...]``: the per-sample FLOP table of a config."""
    import sys

    from alignclip.config import parse_cli
    from alignclip.errors import run_command

    prog = "python -m alignclip.training.flops"
    args = sys.argv[1:] if argv is None else argv
    return run_command(prog, lambda: print_table(parse_cli(["--config", *args], prog=prog)[0]))


def print_table(config) -> None:
    flops = step_flops(config)
    print(f"{config.model.arch}, global batch {flops.notes['global_batch']}: FLOPs per sample of one training step")
    print(flops.table())
    print(f"activations kept for the backward (16-bit, fused attention): "
          f"{activation_bytes_per_sample(config.model) / 1e6:.1f} MB per sample")


if __name__ == "__main__":
    raise SystemExit(main())
