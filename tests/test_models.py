import math

import pytest
import torch
import torch.nn.functional as F

from alignclip.config import load_config
from alignclip.models import build_model, count_parameters
from alignclip.tokenizer import get_tokenizer

TINY = ["model/clip_tiny", "model/sharedclip_tiny", "model/alignclip_tiny"]


def block_params(w: int, mlp: int) -> int:
    # LN (2w) + qkv (3w^2 + 3w) + out proj (w^2 + w) + LN (2w) + fc1 (w*mlp + mlp) + fc2 (mlp*w + w)
    return 2 * w + 3 * w * w + 3 * w + w * w + w + 2 * w + w * mlp + mlp + mlp * w + w


def expected_params(m) -> int:
    v, t = m.vision, m.text
    grid = (v.image_size // v.patch_size) ** 2
    image_stem = 3 * v.patch_size ** 2 * v.width + v.width + (grid + 1) * v.width + 2 * v.width
    text_stem = t.vocab_size * t.width + t.context_length * t.width

    def trunk(w, layers):
        return layers * block_params(w, int(w * 4)) + 2 * w + w * m.embed_dim

    trunks = trunk(v.width, v.layers) if m.arch == "sharedclip" else trunk(v.width, v.layers) + trunk(t.width, t.layers)
    return image_stem + text_stem + trunks + 1  # + logit_scale


@pytest.mark.parametrize("name,approx_millions", [("model/sharedclip_vit_b16", 124.4), ("model/alignclip_vit_b16", 124.4),
                                                  ("model/clip_vit_b16_openclip", 149.6), ("model/clip_vit_b16", 210.0)])
def test_paper_scale_parameter_counts_match_arithmetic(name, approx_millions):
    m = load_config(name).model
    with torch.device("meta"):
        model = build_model(m)
    n = count_parameters(model)
    assert n == expected_params(m)
    assert abs(n / 1e6 - approx_millions) < 0.1


def _batch(m, b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, m.vision.image_size, m.vision.image_size, generator=g)
    tokens = get_tokenizer(m.text.context_length)(["a red circle", "two blue squares left of a star", "x"][:b])
    return images, tokens


@pytest.mark.parametrize("name", TINY)
def test_tiny_forward_backward_gives_every_parameter_a_gradient(name):
    m = load_config(name).model
    torch.manual_seed(0)
    model = build_model(m)
    images, tokens = _batch(m)
    out = model(images, tokens)
    assert out["image_embeds"].shape == (3, m.embed_dim) and out["text_embeds"].shape == (3, m.embed_dim)
    assert torch.allclose(out["image_embeds"].norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(out["text_embeds"].norm(dim=-1), torch.ones(3), atol=1e-5)
    assert math.isclose(out["log_logit_scale"].item(), math.log(1 / 0.07), rel_tol=1e-6)
    assert "logit_scale" not in out and "image_features" not in out  # OpenCLIP's keys mean other things
    # a joint contrastive step
    logits = out["log_logit_scale"].exp() * out["image_embeds"] @ out["text_embeds"].T
    y = torch.arange(3)
    loss = (F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y)) / 2
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    # token rows of words not in this batch get no gradient by construction; the table itself must
    assert missing == [], missing


def test_sharedclip_has_one_trunk_and_text_alone_trains_it():
    m = load_config("model/sharedclip_tiny").model
    model = build_model(m)
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.startswith(("image_trunk", "text_trunk")) for n in names)
    assert sum(n.startswith("trunk.blocks.0.attn.qkv.weight") for n in names) == 1
    _, tokens = _batch(m)
    model.encode_text(tokens).sum().backward()
    assert model.trunk.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.trunk.proj.weight.grad.abs().sum() > 0
    assert model.image_stem.patch_embed.weight.grad is None  # the image-only stem is not touched by text


def test_clip_towers_are_separate():
    model = build_model(load_config("model/clip_tiny").model)
    assert model.image_trunk is not model.text_trunk
    assert model.image_trunk.blocks[0].attn.qkv.weight.data_ptr() != model.text_trunk.blocks[0].attn.qkv.weight.data_ptr()


@pytest.mark.parametrize("name", ["model/clip_tiny", "model/sharedclip_tiny"])
def test_text_is_causal_a_later_token_does_not_change_earlier_positions(name):
    m = load_config(name, ["model.pooled_last_block=false"]).model  # every position of the last block, to compare
    torch.manual_seed(0)
    model = build_model(m).eval()
    tokens = get_tokenizer(m.text.context_length)(["a red circle left of a blue square"])
    changed = tokens.clone()
    changed[0, 5] = 1000  # a token after position 3
    captured = []
    trunk = model._trunk_for("text")
    hook = trunk.blocks[-1].register_forward_hook(lambda mod, inp, out: captured.append(out.detach()))
    with torch.no_grad():
        model.encode_text(tokens)
        model.encode_text(changed)
    hook.remove()
    a, b = captured
    assert torch.allclose(a[0, :5], b[0, :5], atol=1e-6)
    assert not torch.allclose(a[0, 5:], b[0, 5:], atol=1e-4)


def test_images_are_not_causal():
    m = load_config("model/clip_tiny").model
    torch.manual_seed(0)
    model = build_model(m).eval()
    images, _ = _batch(m, b=1)
    changed = images.clone()
    changed[..., -8:, -8:] += 1.0  # only the last patch
    with torch.no_grad():
        assert not torch.allclose(model.encode_image(images), model.encode_image(changed), atol=1e-5)


def test_logit_scale_is_clamped_in_forward_at_ln_100():
    m = load_config("model/clip_tiny").model
    model = build_model(m)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    images, tokens = _batch(m)
    assert math.isclose(model(images, tokens)["log_logit_scale"].exp().item(), 100.0, rel_tol=1e-5)


def _joint_step(m, configure):
    """The same seeded model, configured by ``configure(model)``, after one joint forward + backward."""
    images, tokens = _batch(m)
    torch.manual_seed(0)
    model = build_model(m)
    configure(model)
    out = model(images, tokens)
    (out["image_embeds"] * out["text_embeds"]).sum().backward()
    return model, out


def test_grad_checkpointing_gives_the_same_gradients():
    m = load_config("model/sharedclip_tiny").model
    grads = []
    for ckpt in (False, True):
        model, _ = _joint_step(m, lambda model: model.set_grad_checkpointing(ckpt))
        grads.append(model.trunk.blocks[0].mlp.fc1.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.heavy  # builds every model config, the paper-scale ones included, in a subprocess
def test_size_command_prints_every_model_config():
    import subprocess
    import sys

    from tests.helpers import REPO_ROOT

    out = subprocess.run([sys.executable, "-m", "alignclip.models"], capture_output=True, text=True, cwd=REPO_ROOT,
                         check=True).stdout
    assert "sharedclip_vit_b16" in out and "124,393,729" in out


@pytest.mark.parametrize("causal", [False, True])
def test_pooled_last_block_equals_the_full_block_at_the_pooled_rows_values_and_gradients(causal):
    from alignclip.models.layers import pooled_block

    m = load_config("model/clip_tiny").model
    torch.manual_seed(0)
    block = build_model(m).text_trunk.blocks[-1]
    x = torch.randn(5, m.text.context_length, m.text.width, requires_grad=True)
    index = torch.tensor([0, 3, 31, 7, 12])
    results = []
    for run in ("full", "pooled"):
        block.zero_grad()
        x.grad = None
        rows = block(x, is_causal=causal)[torch.arange(5), index] if run == "full" else \
            pooled_block(block, x, index, causal)
        (rows * torch.linspace(-1, 1, m.text.width)).sum().backward()
        results.append((rows.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in block.named_parameters()}))
    (full, full_dx, full_grads), (pooled, pooled_dx, pooled_grads) = results
    torch.testing.assert_close(pooled, full, rtol=0, atol=1e-5)
    torch.testing.assert_close(pooled_dx, full_dx, rtol=0, atol=1e-5)
    for name, grad in full_grads.items():
        torch.testing.assert_close(pooled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("name", ["model/clip_tiny", "model/sharedclip_tiny"])
def test_pooled_last_block_model_gives_the_same_embeddings_and_gradients(name):
    m = load_config(name).model
    results = []
    for pooled in (False, True):
        model, out = _joint_step(m, lambda model: model.set_pooled_last_block(pooled))
        results.append((out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (full, full_grads), (pooled, pooled_grads) = results
    for key in ("image_embeds", "text_embeds"):
        torch.testing.assert_close(pooled[key], full[key], rtol=0, atol=1e-6)
    assert pooled_grads.keys() == full_grads.keys()
    for name_, grad in full_grads.items():
        torch.testing.assert_close(pooled_grads[name_], grad, rtol=1e-4, atol=1e-6, msg=name_)


def test_encoders_follow_openclip_normalize_false_and_one_layernorm_eps():
    m = load_config("model/clip_tiny").model
    torch.manual_seed(0)
    model = build_model(m)
    images, tokens = _batch(m)
    raw = model.encode_image(images)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(3), atol=1e-3)  # OpenCLIP: unnormalised by default
    torch.testing.assert_close(model.encode_image(images, normalize=True), F.normalize(raw, dim=-1))
    torch.testing.assert_close(model(images, tokens)["text_embeds"], model.encode_text(tokens, normalize=True))
    assert {mod.eps for mod in model.modules() if isinstance(mod, torch.nn.LayerNorm)} == {m.norm_eps} == {1e-5}


@pytest.mark.parametrize("side", [64, 63, 50, 17])
def test_hybrid_stem_is_timms_hybrid_vit_root_to_the_bit(side):
    """model.vision.stem: hybrid, written in plain torch (it also runs inside Hugging Face exports), equals timm's
    own modules of the hybrid ViT's ResNet-v2 root (weight-standardised 7x7 "same" conv, GroupNormAct, "same" max
    pool) and HybridEmbed's bias-free projection, the ones OpenCLIP's timm tower builds, on odd sizes too (the
    "same" padding puts the odd pixel after)."""
    from timm.models.vision_transformer_hybrid import _resnetv2

    from alignclip.models.stems import hybrid_stem

    torch.manual_seed(side)
    ours = hybrid_stem(8, 48)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.1 * torch.randn_like(p))
    theirs = torch.nn.Sequential()
    theirs.add_module("backbone", _resnetv2(layers=()))
    theirs.add_module("proj", torch.nn.Conv2d(64, 48, 2, stride=2, bias=False))
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(3, 3, side, side)
    assert torch.equal(ours(x), theirs(x))
    assert ours.weight is ours.backbone.conv.weight  # what transformers' CLIP reads its input dtype from


def test_hybrid_stem_gives_the_patch_grid_per_image_and_every_parameter_a_gradient():
    config = load_config("model/clip_tiny", ["model.vision.stem=hybrid"])
    model = build_model(config.model)
    images = torch.randn(2, 3, 64, 64, requires_grad=True)
    tokens = model.image_stem(images)
    assert tokens.shape == (2, 65, 64)
    (tokens[0, 1 + 9] * torch.linspace(-1, 1, 64)).sum().backward()
    assert images.grad[0].abs().sum() > 0 and images.grad[1].abs().sum() == 0  # GroupNorm: no batch statistics
    model.zero_grad()
    out = model(torch.randn(2, 3, 64, 64), torch.randint(1, 400, (2, config.model.text.context_length)))
    (out["image_embeds"].sum() + out["text_embeds"].sum()).backward()
    assert all(p.grad is not None for n, p in model.image_stem.named_parameters() if n != "class_token")


def test_conv_stem_gives_the_patch_grid_from_strided_convolutions_and_every_parameter_a_gradient():
    """model.vision.stem: conv (Xiao et al. 2021): 3x3 stride-2 convs 3 -> 16 -> 32 -> 64 then a 1x1 projection,
    the same 8 x 8 grid as 8 px patches; the per-channel GroupNorm keeps each image's tokens its own."""
    config = load_config("model/clip_tiny", ["model.vision.stem=conv"])
    model = build_model(config.model)
    convs = [m for m in model.image_stem.patch_embed if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (3, 16, (3, 3), (2, 2)), (16, 32, (3, 3), (2, 2)), (32, 64, (3, 3), (2, 2)), (64, 64, (1, 1), (1, 1))]
    images = torch.randn(2, 3, 64, 64, requires_grad=True)
    tokens = model.image_stem(images)
    assert tokens.shape == (2, 65, 64)
    (tokens[0, 1 + 9] * torch.linspace(-1, 1, 64)).sum().backward()  # (a plain sum of a LayerNorm is constant)
    assert images.grad[0].abs().sum() > 0 and images.grad[1].abs().sum() == 0  # no statistics across the batch
    model.zero_grad()
    out = model(torch.randn(2, 3, 64, 64), torch.randint(1, 400, (2, config.model.text.context_length)))
    (out["image_embeds"].sum() + out["text_embeds"].sum()).backward()
    assert all(p.grad is not None for n, p in model.image_stem.named_parameters() if n != "class_token"), "stem"
