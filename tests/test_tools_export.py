"""Export a real DeepSpeed checkpoint (ZeRO 0 and 1) to safetensors and load it back without DeepSpeed."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.ranks import run_on_ranks


def _train_and_checkpoint(rank, world_size, run_root: str):
    """Train the tiny CLIP a few steps under DeepSpeed (ZeRO 0 fp32, ZeRO 1 fp32, ZeRO 1 bf16); save as the trainer
    does. Returns per run: inputs, the module's embeddings, its logit scale, and its weights (bf16 under bf16)."""
    from alignclip.config import load_config, save_config
    from alignclip.losses import build_objective
    from alignclip.models import build_model
    from alignclip.training.checkpoint import TrainerState, save_checkpoint
    from alignclip.training.deepspeed_config import build_deepspeed_config
    from alignclip.training.engine import initialize_engine

    results = {}
    for run, stage, precision in (("zero0", 0, "fp32"), ("zero1", 1, "fp32"), ("zero1_bf16", 1, "bf16")):
        config = load_config("model/clip_tiny", [f"deepspeed.zero_stage={stage}", "train.global_batch_size=4",
                                                 f"run_dir={run_root}/{run}", f"train.precision={precision}"])
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
            loss = objective(out["image_embeds"], out["text_embeds"], out["logit_scale"]).total
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
