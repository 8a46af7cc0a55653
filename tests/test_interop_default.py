"""`make run`'s two models travel: the embedded default's CLIP and AlignCLIP share one model shape with the hybrid
stem, and, built exactly from their shipped configs and exported from a checkpoint, load in open_clip (its timm
tower) and in transformers (AutoModel with the modeling file the export ships) and give our embeddings through each
library's own preprocess and tokenizer on real-looking non-square, tiny, huge and transparent pictures and on
duplicate and non-ASCII captions. Our own tools read both exports back. The conv stem still goes to Hugging Face;
OpenCLIP refuses it, and a hybrid model with another LayerNorm eps than timm's, in one line naming the key."""

import subprocess
import sys

import pytest
import torch

from tests.helpers.tiny import perturbed_model, zero0_checkpoint
from tests.test_interop_preprocess import real_looking_cases, worst_through_own_preprocess

CAPTIONS = ["a triangle", "a triangle", "a red circle", "ein grünes Quadrat", "一个蓝色的菱形", "x",
            "a photo of a cross " * 8]
CONFIGS = ["embedded_clip", "embedded_default"]


def export_both(root, config_name: str, overrides=()):
    """(our model, its config, OpenCLIP folder, HF folder): a perturbed model of the config, exported by the CLI
    from a checkpoint into both formats."""
    from alignclip.commands.export import main

    model, config = perturbed_model(f"experiment/{config_name}", list(overrides))
    zero0_checkpoint(root / "run", model, config)
    for fmt in ("openclip", "hf"):
        assert main([str(root / "run"), str(root / fmt), "--format", fmt]) == 0
    return model, config, root / "openclip", root / "hf"


@pytest.fixture(scope="module", params=CONFIGS)
def exported(request, tmp_path_factory):
    return export_both(tmp_path_factory.mktemp(request.param), request.param)


def test_make_runs_models_share_the_architecture_and_context():
    from alignclip.config import load_config

    clip, alignclip = (load_config(f"experiment/{n}").model for n in ("embedded_clip", "embedded_default"))
    assert (clip.arch, alignclip.arch) == ("clip", "sharedclip")
    assert clip.vision == alignclip.vision and clip.text == alignclip.text and clip.text.context_length == 24
    assert (clip.vision.stem, clip.norm_eps, alignclip.norm_eps) == ("hybrid", 1e-6, 1e-6)


def test_every_shipped_model_config_exports_to_both_libraries():
    """Every model a shipped recipe trains (configs/model, configs/experiment) can leave: OpenCLIP and HF take it."""
    from alignclip.config import load_config
    from alignclip.models.convert import check_exportable, exact_norm_eps
    from alignclip.paths import CONFIG_DIR

    names = [f"{kind}/{p.stem}" for kind in ("model", "experiment")
             for p in sorted((CONFIG_DIR / kind).glob("*.yaml"))]
    assert len(names) >= 10 and "experiment/embedded_default" in names
    for name in names:
        model = load_config(name).model
        exact_norm_eps(model)
        for library in ("openclip", "hf"):
            check_exportable(model, library)


# Run in a fresh interpreter with alignclip unimportable: what an OpenCLIP or transformers user without alignclip
# gets from the two folders.
WITHOUT_ALIGNCLIP = """
import sys
sys.modules["alignclip"] = None
import open_clip, torch
from transformers import AutoModel
oc_dir, hf_dir, pixels, out = sys.argv[1:]
x = torch.load(pixels)
oc = open_clip.create_model("local-dir:" + oc_dir).eval()
hf = AutoModel.from_pretrained(hf_dir, trust_remote_code=True).eval()
from PIL import Image
from transformers import pipeline
classify = pipeline("zero-shot-image-classification", model=hf_dir, trust_remote_code=True)
scores = classify(Image.new("RGB", (80, 50), (200, 30, 30)), candidate_labels=["a circle", "a square"])
with torch.no_grad():
    h = hf.get_image_features(pixel_values=x)
    torch.save({"openclip": oc.encode_image(x), "hf": getattr(h, "pooler_output", h),
                "hf_class": type(hf).__name__, "timm": type(oc.visual.trunk).__module__,
                "pipeline_class": type(classify.model).__name__, "scores": sum(r["score"] for r in scores)}, out)
"""


@pytest.mark.heavy
def test_both_exports_load_and_agree_without_alignclip_installed(exported, tmp_path):
    import os

    model, config, oc_dir, hf_dir = exported
    assert (oc_dir / "timm_image_tower" / "config.json").is_file()
    assert {"modeling_alignclip.py", "stems.py"} <= {p.name for p in hf_dir.iterdir()}
    oc_card, hf_card = ((d / "README.md").read_text() for d in (oc_dir, hf_dir))
    assert "hybrid ViT's ResNet-v2 root" in oc_card and "timm_model_name" in oc_card
    assert "trust_remote_code=True" in hf_card  # the card says how to load it
    torch.manual_seed(1)
    x = torch.randn(5, 3, 64, 64)
    torch.save(x, tmp_path / "x.pt")
    env = {**os.environ, "PYTHONPATH": ""}  # nothing of the repository on the path
    subprocess.run([sys.executable, "-c", WITHOUT_ALIGNCLIP, str(oc_dir), str(hf_dir), str(tmp_path / "x.pt"),
                    str(tmp_path / "out.pt")], check=True, cwd=tmp_path, env=env, timeout=600)
    out = torch.load(tmp_path / "out.pt")
    assert out["hf_class"] == out["pipeline_class"] == "AlignCLIPModel" and out["timm"].startswith("timm.")
    assert out["scores"] == pytest.approx(1.0)  # HF's zero-shot pipeline runs on it
    with torch.no_grad():
        ours = model.encode_image(x)
    assert float((out["openclip"] - ours).abs().max()) <= 1e-5
    assert float((out["hf"] - ours).abs().max()) <= 1e-5


@pytest.mark.heavy
def test_our_tools_read_both_exports_back_and_training_starts_from_them(exported):
    """open_model (alignclip-eval, -gap, -distill, alignclip.load) reads both folders as the hybrid model, and
    model.init_from on either builds the config they came from with the same embeddings at step 0."""
    from dataclasses import replace

    from alignclip.interop import init_weights, open_model
    from alignclip.models import build_model

    model, config, oc_dir, hf_dir = exported
    torch.manual_seed(2)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        ours = model.encode_image(x)
        for folder in (oc_dir, hf_dir):
            opened = open_model(str(folder))
            assert opened.config.model.vision.stem == "hybrid" and opened.config.model.norm_eps == 1e-6
            cfg = replace(config.model, init_from=str(folder))
            fresh = build_model(cfg).eval()
            assert "(exact)" in init_weights(fresh, cfg)
            for built in (opened.model, fresh):
                assert float((built.encode_image(x) - ours).abs().max()) <= 1e-6, folder


def test_exports_under_a_path_with_spaces_and_non_ascii_load_and_the_hf_folder_travels(tmp_path):
    """A folder name with a space and a non-ASCII letter (timm's local-dir: name carries it), and the HF folder
    copied elsewhere: it carries its own modeling code."""
    import shutil

    import open_clip
    from transformers import AutoModel

    root = tmp_path / "my runs ü"
    model, _, oc_dir, hf_dir = export_both(root, "embedded_clip")
    copied = shutil.copytree(hf_dir, tmp_path / "elsewhere" / "hf")
    torch.manual_seed(5)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = model.encode_image(x)
        oc = open_clip.create_model(f"local-dir:{oc_dir}").eval()
        hf = AutoModel.from_pretrained(str(copied), trust_remote_code=True).eval()
        theirs = hf.get_image_features(pixel_values=x)
        theirs = getattr(theirs, "pooler_output", theirs)
        oc_embeds = oc.encode_image(x)
    assert float((oc_embeds - ours).abs().max()) <= 1e-5
    assert float((theirs - ours).abs().max()) <= 1e-5


@pytest.mark.heavy
def test_a_timm_tower_we_cannot_express_is_refused_naming_what_differs(exported, tmp_path):
    import json
    import shutil

    from alignclip.interop import open_model

    _, _, oc_dir, _ = exported
    folder = shutil.copytree(oc_dir, tmp_path / "oc")
    cfg = json.loads((folder / "open_clip_config.json").read_text())
    cfg["model_cfg"]["vision_cfg"]["timm_model_name"] = f"local-dir:{folder / 'timm_image_tower'}"
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    tower = json.loads((folder / "timm_image_tower" / "config.json").read_text())
    tower["model_args"]["act_layer"] = "silu"  # the same weights, another activation
    (folder / "timm_image_tower" / "config.json").write_text(json.dumps(tower))
    with pytest.raises(ValueError, match=r"image MLPs use \['SiLU'\].* not loaded"):
        open_model(str(folder))


def test_a_moved_openclip_folder_is_refused_saying_which_path_to_fix(exported, tmp_path):
    import json
    import shutil

    from alignclip.interop import open_model

    _, _, oc_dir, _ = exported
    folder = shutil.copytree(oc_dir, tmp_path / "moved")
    cfg = json.loads((folder / "open_clip_config.json").read_text())
    cfg["model_cfg"]["vision_cfg"]["timm_model_name"] = f"local-dir:{tmp_path / 'gone' / 'timm_image_tower'}"
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))  # as if exported to tmp_path/gone and moved
    with pytest.raises(FileNotFoundError, match="timm_model_name.*timm_image_tower, or export again"):
        open_model(str(folder))


@pytest.mark.heavy
def test_the_conv_stem_goes_to_hugging_face_and_openclip_refuses_it_by_name(tmp_path, capsys):
    from transformers import AutoModel

    from alignclip.commands.export import main
    from alignclip.interop import open_model

    model, config = perturbed_model("experiment/embedded_default", ["model.vision.stem=conv",
                                                                     "model.vision.stem_channels=128"])
    zero0_checkpoint(tmp_path / "run", model, config)
    assert main([str(tmp_path / "run"), str(tmp_path / "oc"), "--format", "openclip"]) == 2
    err = capsys.readouterr().err
    assert "model.vision.stem" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "oc").exists()
    assert main([str(tmp_path / "run"), str(tmp_path / "hf"), "--format", "hf"]) == 0
    hf = AutoModel.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True).eval()
    torch.manual_seed(3)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        ours = model.encode_image(x)
        theirs = hf.get_image_features(pixel_values=x)
        theirs = getattr(theirs, "pooler_output", theirs)
        back = open_model(str(tmp_path / "hf"))
        assert (back.config.model.vision.stem, back.config.model.vision.stem_channels) == ("conv", 128)
        assert float((back.model.encode_image(x) - ours).abs().max()) <= 1e-6
    assert float((theirs - ours).abs().max()) <= 1e-5


def test_a_hybrid_model_with_another_eps_than_timms_is_refused_by_openclip_by_name(tmp_path, capsys):
    from alignclip.commands.export import main

    model, config = perturbed_model("experiment/embedded_clip", ["model.norm_eps=1e-5"])
    zero0_checkpoint(tmp_path / "run", model, config)
    assert main([str(tmp_path / "run"), str(tmp_path / "oc"), "--format", "openclip"]) == 2
    err = capsys.readouterr().err
    assert "model.norm_eps" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "oc").exists()


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
    from transformers import AutoModel, CLIPProcessor

    from alignclip.tokenizer import get_tokenizer

    model, config, oc_dir, hf_dir = exported
    context = config.model.text.context_length
    tokens = get_tokenizer(context)(CAPTIONS)
    oc_model = open_clip.create_model(f"local-dir:{oc_dir}").eval()
    oc_tokens = open_clip.get_tokenizer(f"local-dir:{oc_dir}")(CAPTIONS)
    torch.testing.assert_close(oc_tokens, tokens, atol=0, rtol=0)
    hf_model = AutoModel.from_pretrained(str(hf_dir), trust_remote_code=True).eval()
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
