"""Export a real DeepSpeed checkpoint (ZeRO 0 and 1) to safetensors and load it back without DeepSpeed; export to
OpenCLIP and Hugging Face folders that those libraries load and that give our embeddings."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.ranks import run_on_ranks
from tests.helpers.tiny import perturbed_model, zero0_checkpoint


def _train_and_checkpoint(rank, world_size, run_root: str):
    """Train the tiny CLIP a few steps under DeepSpeed (ZeRO 0 fp32, ZeRO 1 fp32, ZeRO 1 bf16); save as the trainer
    does. Returns per run: inputs, the module's embeddings, its logit scale, and its weights (bf16 under bf16)."""
    from alignclip.config import load_config, save_config
    from alignclip.losses import build_objective
    from alignclip.models import build_model
    from alignclip.checkpoints import TrainerState
    from alignclip.training.checkpoint import save_checkpoint
    from alignclip.training.deepspeed_config import build_deepspeed_config
    from alignclip.training.engine import initialize_engine

    results = {}
    for run, stage, precision in (("zero0", 0, "fp32"), ("zero1", 1, "fp32"), ("zero1_bf16", 1, "bf16")):
        config = load_config("model/clip_tiny", [f"deepspeed.zero_stage={stage}", "train.global_batch_size=4",
                                                 f"run_dir={run_root}/{run}", f"fast_path.precision={precision}"])
        torch.manual_seed(stage)
        model = build_model(config.model)
        objective = build_objective(config.loss)
        engine = initialize_engine(model, torch.optim.AdamW(model.parameters(), lr=1e-2),
                                   build_deepspeed_config(config, world_size, "cpu"))
        images = torch.randn(4, 3, 64, 64, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
        tokens = torch.randint(1, 400, (4, config.model.text.context_length))
        tokens[:, -1] = 49407
        for _ in range(3):
            out = engine(images, tokens)
            loss = objective(out["image_embeds"], out["text_embeds"], out["log_logit_scale"]).total
            engine.backward(loss)
            engine.step()
        save_config(config, config.run_dir)
        save_checkpoint(engine, config.run_dir, TrainerState(step=3, world_size=world_size), keep=2)
        with torch.no_grad():
            engine.module.eval()
            results[run] = (images, tokens, engine.module.encode_image(images), engine.module.encode_text(tokens),
                            engine.module.logit_scale.detach().clone(),
                            {k: v.detach().clone() for k, v in engine.module.state_dict().items()})
    return results


@pytest.mark.heavy
def test_export_then_load_reproduces_the_trained_model(tmp_path):
    import alignclip
    from alignclip.export import export_checkpoint, read_config

    (results,) = run_on_ranks(_train_and_checkpoint, 1, str(tmp_path))
    for run, (images, tokens, image_embeds, text_embeds, logit_scale, module_state) in results.items():
        out = export_checkpoint(tmp_path / run, tmp_path / f"{run}.safetensors")
        assert Path(str(out) + ".yaml").read_text().startswith("name:")
        assert read_config(out).deepspeed.zero_stage == (0 if run == "zero0" else 1)
        model, tokenizer, transform = alignclip.load(out)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        if run == "zero1_bf16":
            # the export holds the fp32 master weights: bf16-rounding them gives the engine's bf16 module copy,
            # and they carry more precision than that copy
            exported = model.state_dict()
            more_precise = 0
            for key, bf16_value in module_state.items():
                torch.testing.assert_close(exported[key].to(torch.bfloat16), bf16_value, atol=0, rtol=0)
                more_precise += int((exported[key] != bf16_value.float()).any())
            assert more_precise > 0
            continue
        with torch.no_grad():
            torch.testing.assert_close(model.encode_image(images), image_embeds, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(model.encode_text(tokens), text_embeds, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.logit_scale.detach(), logit_scale)
        assert tokenizer("a photo of a cat").shape == (1, 32)
        from PIL import Image

        pixels = transform(Image.new("RGB", (80, 100), (255, 0, 0)))
        assert pixels.shape == (3, 64, 64)
    # the same checkpoint as OpenCLIP and HF folders, with a card naming the run's steps
    for fmt in ("openclip", "hf"):
        folder = export_checkpoint(tmp_path / "zero1", tmp_path / f"zero1_{fmt}", format=fmt)
        card = (folder / "README.md").read_text()
        assert "steps: 3" in card and "clip_weight 1" in card
    # loading needs neither DeepSpeed nor pickle: a fresh interpreter never imports deepspeed

    code = ("import sys, alignclip; alignclip.load(sys.argv[1]); "
            "assert 'deepspeed' not in sys.modules, 'alignclip.load imported deepspeed'")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "zero1.safetensors")], check=True,
                   cwd=Path(__file__).resolve().parent.parent)


def test_loading_rejects_a_safetensors_file_without_config(tmp_path):
    from safetensors.torch import save_file

    from alignclip.export import load_model

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="alignclip_config"):
        load_model(tmp_path / "plain.safetensors")


# ------------------------------------------------------------------------------ OpenCLIP and Hugging Face exports
TEXTS = ["a red circle", "two blue squares left of a star", "x", "a photo of a cat " * 12]
LARGEST_DIFFERENCE: dict[str, float] = {}  # (model, library) -> max |ours - theirs|, printed by the last test


def _record(key, *diffs):
    LARGEST_DIFFERENCE[key] = max(float(d.abs().max()) for d in diffs)
    print(f"{key}: largest embedding difference {LARGEST_DIFFERENCE[key]:.2e}")
    assert LARGEST_DIFFERENCE[key] <= 1e-5


@pytest.mark.parametrize("name", ["model/clip_tiny", "model/sharedclip_tiny"])
def test_openclip_local_dir_loads_without_key_warnings_and_gives_our_embeddings(name, tmp_path, caplog):
    import logging
    import warnings

    import open_clip

    from alignclip.export import save_openclip
    from alignclip.tokenizer import get_tokenizer

    model, config = perturbed_model(name)
    out = save_openclip(model, config, tmp_path / "oc")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "open_clip_config.json",
                                                     "open_clip_model.safetensors"]
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        theirs, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "missing" in m.lower() or "unexpected" in m.lower()], messages
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    tokens = get_tokenizer(config.model.text.context_length)(TEXTS)
    torch.testing.assert_close(tokenizer(TEXTS), tokens, atol=0, rtol=0)
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    theirs.eval()
    with torch.no_grad():
        _record(f"{config.model.arch} OpenCLIP", theirs.encode_image(images) - model.encode_image(images),
                theirs.encode_text(tokens) - model.encode_text(tokens))
        out_dict = theirs(images, tokens)
        scale = out_dict["logit_scale"] if isinstance(out_dict, dict) else out_dict[2]
        torch.testing.assert_close(scale.reshape(1), model.logit_scale.exp())  # OpenCLIP's is exp'd
    assert preprocess.transforms[0].size in (64, [64], (64, 64))
    card = (out / "README.md").read_text()
    assert "local-dir:" in card and config.model.arch in card
    assert ("written into both" in card) == (config.model.arch == "sharedclip")


@pytest.mark.parametrize("name", ["model/clip_tiny", "model/sharedclip_tiny"])
def test_hf_folder_loads_with_clip_model_and_processor_and_gives_our_embeddings(name, tmp_path):
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    from alignclip.data.transforms import ImageTransform
    from alignclip.export import save_hf
    from alignclip.tokenizer import get_tokenizer

    model, config = perturbed_model(name)
    out = save_hf(model, config, tmp_path / "hf")
    theirs = CLIPModel.from_pretrained(str(out)).eval()
    processor = CLIPProcessor.from_pretrained(str(out))
    context = config.model.text.context_length
    enc = processor(text=TEXTS, padding="max_length", max_length=context, truncation=True, return_tensors="pt")
    ours = get_tokenizer(context)(TEXTS)
    # HF pads with the end token (OpenAI's choice), we pad with 0: the ids up to the first end token agree
    eot = ours.argmax(-1)
    for row in range(len(TEXTS)):
        assert enc["input_ids"][row, :eot[row] + 1].tolist() == ours[row, :eot[row] + 1].tolist()
    pictures = [Image.new("RGB", (64, 64), (200, 30, 30)), Image.new("RGB", (64, 64), (10, 90, 250))]
    pixels = processor(images=pictures, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixels, ImageTransform(64)(pictures), atol=1e-5, rtol=0)
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        their_text = theirs.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        their_image = theirs.get_image_features(pixel_values=images)
        their_text = getattr(their_text, "pooler_output", their_text)  # transformers 5 returns the model output
        their_image = getattr(their_image, "pooler_output", their_image)
        _record(f"{config.model.arch} HF", their_image - model.encode_image(images),
                their_text - model.encode_text(ours))
    assert "CLIPModel.from_pretrained" in (out / "README.md").read_text()


def test_a_model_with_the_old_mixed_eps_loads_and_refuses_an_inexact_export(tmp_path):
    from alignclip.config import from_yaml_text, load_config, to_yaml
    from alignclip.export import save_openclip
    from alignclip.models import build_model
    from alignclip.models.convert import ExportError

    text = "\n".join(line for line in to_yaml(load_config("model/clip_tiny")).splitlines()
                     if "norm_eps" not in line)  # a config saved before model.norm_eps existed
    old = from_yaml_text(text)
    assert old.model.norm_eps is None and load_config("model/clip_tiny").model.norm_eps == 1e-5
    model = build_model(old.model)
    assert model.text_trunk.blocks[0].norm1.eps == 1e-6 and model.text_trunk.norm.eps == 1e-5
    assert model.image_stem.norm_pre.eps == 1e-5
    with pytest.raises(ExportError, match="norm_eps"):
        save_openclip(model, old, tmp_path / "oc")
    save_openclip(model, old, tmp_path / "oc", allow_inexact=True)
    assert "1e-3" in (tmp_path / "oc" / "README.md").read_text()


def test_a_conv_stem_model_is_refused_by_openclip_before_anything_is_written_and_goes_to_hf(tmp_path):
    from alignclip.config import load_config
    from alignclip.export import load_model, save_exported, save_hf, save_openclip
    from alignclip.models import build_model
    from alignclip.models.convert import ExportError

    config = load_config("model/clip_tiny", ["model.vision.stem=conv"])
    model = build_model(config.model)
    with pytest.raises(ExportError, match="model.vision.stem"):
        save_openclip(model, config, tmp_path / "oc")
    assert not (tmp_path / "oc").exists()
    save_hf(model, config, tmp_path / "hf")  # through its modeling file (tests/test_interop_default.py loads it)
    assert (tmp_path / "hf" / "modeling_alignclip.py").is_file()
    path = save_exported(model, config, tmp_path / "conv.safetensors")  # our own format holds it
    back, back_config = load_model(path)
    images = torch.randn(2, 3, 64, 64)
    assert back_config.model.vision.stem == "conv"
    assert torch.equal(back.eval().encode_image(images), model.eval().encode_image(images))


def test_export_tool_errors_are_one_line_exit_2(tmp_path):
    from alignclip.commands.export import main

    for argv, expected in (([str(tmp_path / "nope"), str(tmp_path / "o")], "no complete checkpoint"),
                           ([str(tmp_path), str(tmp_path / "o"), "--format", "onnx"], "invalid choice")):
        proc = subprocess.run([sys.executable, "-m", "alignclip.commands.export", *argv], capture_output=True,
                              text=True, cwd=Path(__file__).resolve().parent.parent)
        assert proc.returncode == 2, proc.stderr
        assert expected in proc.stderr and "Traceback" not in proc.stderr
    assert main is not None


def test_export_refuses_an_existing_output_unless_force_and_loses_nothing(tmp_path, capsys):
    import open_clip

    from alignclip.commands.export import main

    model, config = perturbed_model("model/clip_tiny")
    step = zero0_checkpoint(tmp_path / "run", model, config)
    out = tmp_path / "oc"
    assert main([str(step), str(out), "--format", "openclip"]) == 0
    (out / "stale.bin").write_text("from an older export")
    assert main([str(step), str(out), "--format", "openclip"]) == 2
    assert "exists: pass --force" in capsys.readouterr().err and (out / "stale.bin").is_file()
    # a failing export with --force leaves the old one in place
    assert main([str(tmp_path / "nowhere"), str(out), "--format", "openclip", "--force"]) == 2
    assert (out / "stale.bin").is_file()
    assert main([str(step), str(out), "--format", "openclip", "--force"]) == 0
    assert not (out / "stale.bin").exists()
    open_clip.create_model(f"local-dir:{out}")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("not an export")
    assert main([str(step), str(mine), "--format", "hf", "--force"]) == 2
    assert "not an OpenCLIP / HF export" in capsys.readouterr().err and (mine / "notes.txt").is_file()
    file = tmp_path / "m.safetensors"
    assert main([str(step), str(file)]) == 0 and main([str(step), str(file)]) == 2
    assert main([str(step), str(file), "--force"]) == 0 and Path(str(file) + ".yaml").is_file()


def test_hf_folder_has_preprocessor_config_and_alignclip_load_opens_hf_and_openclip_folders(tmp_path):
    from transformers import AutoImageProcessor

    import alignclip
    from alignclip.export import save_hf, save_openclip
    from alignclip.tokenizer import get_tokenizer

    model, config = perturbed_model("model/clip_tiny")
    hf = save_hf(model, config, tmp_path / "hf")
    oc = save_openclip(model, config, tmp_path / "oc")
    assert (hf / "preprocessor_config.json").is_file()
    pil = AutoImageProcessor.from_pretrained(str(hf), backend="pil")
    assert pil.size["shortest_edge"] == 64 and pil.resample == 3  # bicubic
    tokens = get_tokenizer(config.model.text.context_length)(TEXTS)
    images = torch.randn(2, 3, 64, 64)
    for folder in (hf, oc, f"local-dir:{oc}"):
        back, tokenizer, transform = alignclip.load(folder)
        assert torch.equal(tokenizer(TEXTS), tokens) and transform.image_size == 64
        with torch.no_grad():
            torch.testing.assert_close(back.encode_image(images), model.encode_image(images), atol=1e-5, rtol=0)
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="a folder, but neither an OpenCLIP folder"):
        alignclip.load(tmp_path / "plain")
