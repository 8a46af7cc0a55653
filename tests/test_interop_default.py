"""`make run`'s two models and export: the embedded default's CLIP and AlignCLIP share one model shape; with their
convolutional stem, `alignclip-export --format openclip|hf` refuses them naming the key, and with the patch stem
(`model.vision.stem=patch`, the exportable run docs/analysis.md gives) both, built exactly from their shipped
configs and exported from a checkpoint, load in open_clip and transformers and give our embeddings through each
library's own preprocess and tokenizer on real-looking non-square, tiny, huge and transparent pictures and on
duplicate and non-ASCII captions."""

import pytest
import torch

from tests.helpers.tiny import perturbed_model, zero0_checkpoint
from tests.test_interop_preprocess import real_looking_cases, worst_through_own_preprocess

CAPTIONS = ["a triangle", "a triangle", "a red circle", "ein grünes Quadrat", "一个蓝色的菱形", "x",
            "a photo of a cross " * 8]
CONFIGS = ["embedded_clip", "embedded_default"]


@pytest.fixture(scope="module", params=CONFIGS)
def exported(request, tmp_path_factory):
    """(our model, its config, OpenCLIP folder, HF folder) of one of make run's two configs with the patch stem."""
    from alignclip.commands.export import main

    root = tmp_path_factory.mktemp(request.param)
    model, config = perturbed_model(f"experiment/{request.param}", ["model.vision.stem=patch"])
    zero0_checkpoint(root / "run", model, config)
    for fmt in ("openclip", "hf"):
        assert main([str(root / "run"), str(root / fmt), "--format", fmt]) == 0
    return model, config, root / "openclip", root / "hf"


def test_make_runs_models_share_the_architecture_and_context():
    from alignclip.config import load_config

    clip, alignclip = (load_config(f"experiment/{n}").model for n in ("embedded_clip", "embedded_default"))
    assert (clip.arch, alignclip.arch) == ("clip", "sharedclip")
    assert clip.vision == alignclip.vision and clip.text == alignclip.text and clip.text.context_length == 24


@pytest.mark.parametrize("name", CONFIGS)
def test_make_runs_models_with_the_conv_stem_are_refused_by_name_and_nothing_is_written(name, tmp_path, capsys):
    from alignclip.commands.export import main

    model, config = perturbed_model(f"experiment/{name}")
    assert config.model.vision.stem == "conv"
    zero0_checkpoint(tmp_path / "run", model, config)
    for fmt in ("openclip", "hf"):
        assert main([str(tmp_path / "run"), str(tmp_path / fmt), "--format", fmt]) == 2
        err = capsys.readouterr().err
        assert "model.vision.stem" in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / fmt).exists()
    assert main([str(tmp_path / "run"), str(tmp_path / "m.safetensors")]) == 0  # our own format holds them


@pytest.mark.heavy
def test_make_runs_models_give_our_image_embeddings_through_each_librarys_preprocess(exported):
    model, config, oc_dir, hf_dir = exported
    worst = worst_through_own_preprocess(model, oc_dir, hf_dir, config.model.vision.image_size,
                                         real_looking_cases())
    print(config.name, worst)
    assert worst["openclip pixels"] <= 1e-6 and worst["hf pixels"] <= 1e-6
    assert worst["openclip embeddings"] <= 1e-5 and worst["hf embeddings"] <= 1e-5


@pytest.mark.heavy
def test_make_runs_models_give_our_text_embeddings_through_each_librarys_tokenizer(exported):
    import open_clip
    from transformers import CLIPModel, CLIPProcessor

    from alignclip.tokenizer import get_tokenizer

    model, config, oc_dir, hf_dir = exported
    context = config.model.text.context_length
    tokens = get_tokenizer(context)(CAPTIONS)
    oc_model = open_clip.create_model(f"local-dir:{oc_dir}").eval()
    oc_tokens = open_clip.get_tokenizer(f"local-dir:{oc_dir}")(CAPTIONS)
    torch.testing.assert_close(oc_tokens, tokens, atol=0, rtol=0)
    hf_model = CLIPModel.from_pretrained(str(hf_dir)).eval()
    enc = CLIPProcessor.from_pretrained(str(hf_dir))(text=CAPTIONS, padding="max_length", max_length=context,
                                                     truncation=True, return_tensors="pt")
    with torch.no_grad():
        ours = model.encode_text(tokens)
        oc = oc_model.encode_text(oc_tokens)
        hf = hf_model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        hf = getattr(hf, "pooler_output", hf)
    worst = {"openclip": float((oc - ours).abs().max()), "hf": float((hf - ours).abs().max())}
    print(config.name, worst)
    assert worst["openclip"] <= 1e-5 and worst["hf"] <= 1e-5
    assert torch.equal(ours[0], ours[1])  # duplicate captions, one embedding
