"""Export a real DeepSpeed checkpoint (ZeRO 0 and 1) to safetensors and load it back without DeepSpeed."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import run_on_ranks  # noqa: E402


def _train_and_checkpoint(rank, world_size, run_root: str):
    """Train the tiny CLIP a few steps under DeepSpeed for each ZeRO stage; save as the trainer does."""
    import deepspeed

    from alignclip.config import load_config, save_config
    from alignclip.losses import build_objective
    from alignclip.models import build_model
    from alignclip.training.checkpoint import TrainerState, save_checkpoint
    from alignclip.training.deepspeed_config import build_deepspeed_config
    from alignclip.training.loop import _zero_dim_params_as_1d

    results = {}
    for stage in (0, 1):
        config = load_config("model/clip_tiny", [f"deepspeed.zero_stage={stage}", "train.global_batch_size=4",
                                                 f"run_dir={run_root}/zero{stage}", "train.precision=fp32",
                                                 # ZeRO-0 clipping in DeepSpeed 0.19 breaks on the 0-dim logit
                                                 # scale (grad.mul_ of a [1] coefficient); export is what's tested
                                                 f"train.grad_clip={1.0 if stage else 0.0}"])
        torch.manual_seed(stage)
        model = build_model(config.model)
        objective = build_objective(config.loss)
        with _zero_dim_params_as_1d(model):  # the trainer's way past DeepSpeed's broadcast of 0-dim params
            engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                              config=build_deepspeed_config(config, world_size, "cpu"),
                                              optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2))
        images = torch.randn(4, 3, 64, 64)
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
            results[stage] = (images, tokens, engine.module.encode_image(images), engine.module.encode_text(tokens),
                              engine.module.logit_scale.detach().clone())
    return results


@pytest.mark.heavy
def test_export_then_load_reproduces_the_trained_model(tmp_path):
    import alignclip
    from alignclip.export import export_checkpoint, read_config

    (results,) = run_on_ranks(_train_and_checkpoint, 1, str(tmp_path))
    for stage, (images, tokens, image_embeds, text_embeds, logit_scale) in results.items():
        run_dir = tmp_path / f"zero{stage}"
        out = export_checkpoint(run_dir, tmp_path / f"zero{stage}.safetensors")
        assert Path(str(out) + ".yaml").read_text().startswith("name:")
        assert read_config(out).deepspeed.zero_stage == stage
        model, tokenizer, transform = alignclip.load(out)
        with torch.no_grad():
            torch.testing.assert_close(model.encode_image(images), image_embeds, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(model.encode_text(tokens), text_embeds, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.logit_scale.detach(), logit_scale)
        assert tokenizer("a photo of a cat").shape == (1, 32)
        from PIL import Image

        pixels = transform(Image.new("RGB", (80, 100), (255, 0, 0)))
        assert pixels.shape == (3, 64, 64)


def test_loading_rejects_a_safetensors_file_without_config(tmp_path):
    from safetensors.torch import save_file

    from alignclip.export import load_model

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="alignclip_config"):
        load_model(tmp_path / "plain.safetensors")
