"""model.init_from: training starts from a model saved by OpenCLIP or transformers (or by us) with the source's
embeddings at step 0, and the fine-tuned result exports back to OpenCLIP."""

import json
import types

import pytest
import torch

from tests.helpers.ranks import run_on_ranks
from tests.helpers.tiny import tiny_overrides, write_toy_shards

# the tiny_overrides shape: 32 px images in 8 px patches, width 32, one block of two heads per tower, context 16
OPENCLIP_CFG = {"embed_dim": 32, "quick_gelu": False,
                "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
                "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
TEXTS = ["a red disc", "a red disc", "Ünïcode café 東京", "a blue bar on a white background, seen from above"]


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Every parameter moved off its initial value (LayerNorm weights off 1, biases off 0), so a mapping that
    drops or swaps one shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def save_tiny_openclip(folder, seed: int = 0, cfg: dict = OPENCLIP_CFG):
    """A random tiny OpenCLIP CLIP written by open_clip's own save_for_hf (config + safetensors weights)."""
    from dataclasses import asdict

    import open_clip
    from open_clip.model import set_model_preprocess_cfg
    from open_clip.push_to_hf_hub import save_for_hf
    from open_clip.transform import PreprocessCfg

    torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg)
    set_model_preprocess_cfg(model, asdict(PreprocessCfg(size=cfg["vision_cfg"]["image_size"])))
    _perturb(model, seed)
    no_tokenizer_files = types.SimpleNamespace(save_pretrained=lambda directory: None)  # the standard CLIP BPE
    save_for_hf(model, no_tokenizer_files, cfg, str(folder), safe_serialization=True)
    return folder


def save_tiny_hf(folder, seed: int = 0):
    """A random tiny transformers CLIPModel of the same shape, written by save_pretrained."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(projection_dim=32,
                        text_config={"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 1,
                                     "num_attention_heads": 2, "max_position_embeddings": 16,
                                     "hidden_act": "gelu", "eos_token_id": 49407, "bos_token_id": 49406,
                                     "pad_token_id": 49407},
                        vision_config={"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 1,
                                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8,
                                       "hidden_act": "gelu"})
    model = CLIPModel(config)
    _perturb(model, seed)
    model.save_pretrained(str(folder))
    return folder


def _inputs(context: int = 16):
    from alignclip.tokenizer import get_tokenizer

    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    return images, get_tokenizer(context)(TEXTS)


def _openclip_embeddings(spec: str, images, tokens):
    import open_clip

    theirs = open_clip.create_model(spec).eval()
    with torch.no_grad():
        return theirs.encode_image(images), theirs.encode_text(tokens)


def _config(overrides):
    from alignclip.config import load_config

    return load_config(None, overrides)


def test_init_weights_from_openclip_and_hf_give_their_embeddings(tmp_path):
    from transformers import CLIPModel

    from alignclip.interop import init_weights
    from alignclip.models import build_model

    oc = save_tiny_openclip(tmp_path / "oc")
    hf = save_tiny_hf(tmp_path / "hf")
    images, tokens = _inputs()
    their_image, their_text = _openclip_embeddings(f"local-dir:{oc}", images, tokens)
    hf_model = CLIPModel.from_pretrained(str(hf)).eval()
    with torch.no_grad():
        hf_image = hf_model.get_image_features(pixel_values=images)
        hf_text = hf_model.get_text_features(input_ids=tokens)
    hf_image, hf_text = (getattr(x, "pooler_output", x) for x in (hf_image, hf_text))
    for spec, (image, text) in ((f"local-dir:{oc}", (their_image, their_text)), (str(oc), (their_image, their_text)),
                                (str(hf), (hf_image, hf_text))):
        cfg = _config(tiny_overrides(tmp_path / "data", **{"model.init_from": spec})).model
        model = build_model(cfg)
        assert "exact" in init_weights(model, cfg)
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(model.encode_image(images), image, atol=1e-5, rtol=0)
            torch.testing.assert_close(model.encode_text(tokens), text, atol=1e-5, rtol=0)


def test_init_from_another_shape_names_the_overrides_and_exits_2(tmp_path):
    from alignclip.config import ConfigError
    from alignclip.interop import init_weights, main
    from alignclip.models import build_model

    oc = save_tiny_openclip(tmp_path / "oc")
    cfg = _config(tiny_overrides(tmp_path / "data", **{"model.init_from": str(oc), "model.vision.width": 64,
                                                       "model.text.layers": 2})).model
    with pytest.raises(ConfigError, match=r"model.init_from: .* model.vision.width=32 model.text.layers=1$"):
        init_weights(build_model(cfg), cfg)
    cfg.init_from = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="model.init_from: .*nowhere: no such file or folder"):
        init_weights(build_model(cfg), cfg)
    assert main([str(tmp_path / "nowhere")]) == 2
    assert main([str(oc)]) == 0


def test_sharedclip_starts_from_a_two_tower_model_with_its_image_tower(tmp_path):
    from alignclip.config import ConfigError
    from alignclip.export import save_exported
    from alignclip.interop import init_weights, open_model
    from alignclip.models import build_model

    oc = save_tiny_openclip(tmp_path / "oc")
    images, tokens = _inputs()
    their_image, their_text = _openclip_embeddings(f"local-dir:{oc}", images, tokens)
    shared = _config(tiny_overrides(tmp_path / "data", alignclip=True, **{"model.init_from": str(oc)}))
    model = build_model(shared.model)
    assert "image tower" in init_weights(model, shared.model)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), their_image, atol=1e-5, rtol=0)
        assert not torch.allclose(model.encode_text(tokens), their_text, atol=1e-3)
    # our SharedCLIP, exported, starts a CLIP exactly (its trunk in both towers) and a SharedCLIP exactly
    path = save_exported(model, shared, tmp_path / "shared.safetensors")
    for arch in ("clip", "sharedclip"):
        cfg = _config(tiny_overrides(tmp_path / "data", **{"model.init_from": str(path), "model.arch": arch})).model
        again = build_model(cfg)
        assert init_weights(again, cfg).endswith("(exact)")
        with torch.no_grad():
            torch.testing.assert_close(again.eval().encode_text(tokens), model.encode_text(tokens), atol=1e-6,
                                       rtol=0)
    assert open_model(path).config.model.arch == "sharedclip"
    # towers of different widths cannot share a trunk
    wide = {**OPENCLIP_CFG, "vision_cfg": {**OPENCLIP_CFG["vision_cfg"], "width": 64, "head_width": 32}}
    save_tiny_openclip(tmp_path / "wide", cfg=wide)
    cfg = _config(tiny_overrides(tmp_path / "data", alignclip=True, **{"model.init_from": str(tmp_path / "wide")}))
    with pytest.raises(ConfigError, match="different shapes .* model.arch=clip"):
        init_weights(build_model(cfg.model), cfg.model)


def test_quick_gelu_models_are_read_exactly_and_unsupported_features_refused_by_name(tmp_path):
    from alignclip.export import save_hf, save_openclip
    from alignclip.interop import open_model

    quick = save_tiny_openclip(tmp_path / "quick", cfg={**OPENCLIP_CFG, "quick_gelu": True})
    images, tokens = _inputs()
    their_image, their_text = _openclip_embeddings(f"local-dir:{quick}", images, tokens)
    opened = open_model(str(quick))
    assert opened.config.model.act == "quick_gelu"
    with torch.no_grad():
        torch.testing.assert_close(opened.model.encode_image(images), their_image, atol=1e-5, rtol=0)
        torch.testing.assert_close(opened.model.encode_text(tokens), their_text, atol=1e-5, rtol=0)
    # and back out: OpenCLIP's quick_gelu flag, HF's hidden_act
    back = save_openclip(opened.model, opened.config, tmp_path / "back_oc")
    assert json.loads((back / "open_clip_config.json").read_text())["model_cfg"]["quick_gelu"] is True
    hf = save_hf(opened.model, opened.config, tmp_path / "back_hf")
    assert json.loads((hf / "config.json").read_text())["text_config"]["hidden_act"] == "quick_gelu"
    with torch.no_grad():
        torch.testing.assert_close(open_model(str(hf)).model.encode_text(tokens), their_text, atol=1e-5, rtol=0)
    scaled = {**OPENCLIP_CFG, "text_cfg": {**OPENCLIP_CFG["text_cfg"], "ls_init_value": 0.1}}
    with pytest.raises(ValueError, match="layer-scaled"):
        open_model(str(save_tiny_openclip(tmp_path / "scaled", cfg=scaled)))


def _finetune_from(rank, world_size, overrides, images, tokens):
    from alignclip.distributed.env import setup_distributed_env
    from alignclip.training import trainer

    run = trainer.Trainer(_config(overrides), setup_distributed_env())
    model = run.components.model
    model.eval()
    with torch.no_grad():
        step0 = (model.encode_image(images).clone(), model.encode_text(tokens).clone())
    model.train()
    run.train()
    return step0


@pytest.mark.heavy
def test_finetune_from_openclip_starts_equal_and_exports_back_to_openclip(tmp_path):
    import open_clip

    from alignclip.export import export_checkpoint

    oc = save_tiny_openclip(tmp_path / "oc")
    data = {"train": write_toy_shards(tmp_path / "train", num_shards=1, per_shard=32),
            "val": write_toy_shards(tmp_path / "val", num_shards=1, per_shard=16, seed=1)}
    images, tokens = _inputs()
    their_image, their_text = _openclip_embeddings(f"local-dir:{oc}", images, tokens)
    overrides = tiny_overrides(data, tmp_path / "run", alignclip=True, **{
        "model.arch": "clip", "model.init_from": f"local-dir:{oc}", "train.max_steps": 3,
        "logging.tensorboard": False})  # CLIP with CRSep + IMSep: close the gap of an existing CLIP
    ((step0_image, step0_text),) = run_on_ranks(_finetune_from, 1, overrides, images, tokens)
    torch.testing.assert_close(step0_image, their_image, atol=1e-5, rtol=0)
    torch.testing.assert_close(step0_text, their_text, atol=1e-5, rtol=0)
    out = export_checkpoint(tmp_path / "run", tmp_path / "back", format="openclip")
    back = open_clip.create_model(f"local-dir:{out}").eval()
    assert json.loads((out / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]["context_length"] == 16
    with torch.no_grad():
        moved = (back.encode_image(images) - their_image).abs().max()
    assert moved > 1e-4  # three steps of training changed the model
