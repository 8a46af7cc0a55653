"""The OpenCLIP race (tools/benchmarks/openclip_race.py, tools/bench_openclip_race.py) races the same math on both sides:
the two models match parameter for parameter, compute the same embeddings from the same weights, and the two
trainers (ours through DeepSpeed and the trainer's step, OpenCLIP's plain loop) take the same steps."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alignclip.config import ConfigError
from alignclip.models import build_model
from benchmarks import openclip_race as race
from tests.helpers.ranks import run_on_ranks

REPO_ROOT = Path(__file__).resolve().parent.parent


def _pair(model: str | None, seed: int = 0):
    config = race.race_config(model, batch_size=4)
    torch.manual_seed(seed)
    ours = build_model(config.model)
    theirs = race.build_openclip_model(config.model)
    return config, ours, theirs


@pytest.mark.parametrize("model", [None, "clip_tiny"])
def test_every_parameter_has_one_openclip_counterpart_of_the_same_size(model):
    _, ours, theirs = _pair(model)
    their_params = dict(theirs.named_parameters())
    names = [race.openclip_name(name) for name, _ in ours.named_parameters()]
    assert len(set(names)) == len(names) == len(their_params)  # one-to-one, nothing left over on either side
    for name, param in ours.named_parameters():
        assert param.numel() == their_params[race.openclip_name(name)].numel(), name
    assert race.count_parameters(ours) == race.count_parameters(theirs)


def test_race_model_is_a_19m_parameter_vit_clip():
    config, ours, _ = _pair(None)
    v, t = config.model.vision, config.model.text
    assert (v.image_size, v.patch_size, v.width, v.layers, v.heads) == (64, 8, 256, 4, 4)
    assert (t.context_length, t.width, t.layers, t.heads, config.model.embed_dim) == (32, 256, 4, 4, 256)
    assert race.count_parameters(ours) == 19_173_377


def test_copied_weights_give_the_same_embeddings_and_loss():
    from open_clip.loss import ClipLoss

    from alignclip.losses import build_objective

    config, ours, theirs = _pair("clip_tiny")
    race.copy_weights_to_openclip(ours, theirs)
    batch = race.synthetic_batches(config.model, 6, 1, seed=3)[0]
    mine = ours(batch["image"], batch["text"])
    other = theirs(batch["image"], batch["text"])
    torch.testing.assert_close(mine["image_embeds"], other["image_features"], rtol=0, atol=1e-5)
    torch.testing.assert_close(mine["text_embeds"], other["text_features"], rtol=0, atol=1e-5)
    our_loss = build_objective(config.loss)(mine["image_embeds"], mine["text_embeds"], mine["log_logit_scale"]).total
    their_loss = ClipLoss()(**other)
    assert abs(float(our_loss.detach()) - float(their_loss.detach())) < 1e-5


def test_synthetic_token_rows_end_in_the_end_of_text_id_where_text_is_pooled():
    config = race.race_config("clip_tiny", batch_size=4)
    batch = race.synthetic_batches(config.model, 32, 1, seed=0)[0]
    tokens = batch["text"]
    assert (tokens[:, 0] == race.SOT_ID).all()
    assert ((tokens == race.EOT_ID).sum(dim=1) == 1).all()  # exactly one end of text per row ...
    assert (tokens.argmax(dim=1) == (tokens == race.EOT_ID).int().argmax(dim=1)).all()  # ... at the argmax
    assert len(set(tokens.argmax(dim=1).tolist())) > 1  # at varying positions


def test_the_race_refuses_to_change_the_model_or_the_loss_and_needs_two_towers():
    with pytest.raises(ConfigError, match="model"):
        race.race_config("clip_tiny", overrides=("model.vision.layers=3",))
    with pytest.raises(ConfigError, match="loss"):
        race.race_config("clip_tiny", overrides=("loss.imsep_weight=0.5",))
    with pytest.raises(ConfigError, match="arch 'clip'"):
        race.race_config("sharedclip_tiny")
    assert race.race_config("clip_tiny", overrides=("deepspeed.zero_stage=0",)).deepspeed.zero_stage == 0


def _train_both_sides(rank, world_size, steps, pooled_last_block):
    """Ours (DeepSpeed engine, the trainer's step) and OpenCLIP's loop, from the same weights on the same batches."""
    torch.manual_seed(0)
    config = race.race_config("clip_tiny", batch_size=8, total_steps=steps, lr=1e-3)
    batches = race.synthetic_batches(config.model, 8, steps, seed=1)
    ours, theirs = race.build_trainers(config, steps, pooled_last_block=pooled_last_block)
    losses = [(ours.step(b), theirs.step(b)) for b in batches]
    their_params = dict(theirs.model.named_parameters())
    pairs = {}
    for name, param in ours.model.named_parameters():
        target = their_params[race.openclip_name(name)]
        pairs[name] = (race.as_openclip_tensor(name, param.detach(), target).clone(), target.detach().clone())
    return losses, pairs


@pytest.mark.heavy
@pytest.mark.parametrize("pooled_last_block", [False, True])
def test_both_trainers_take_the_same_steps_from_the_same_weights(pooled_last_block):
    steps, lr = 4, 1e-3
    losses, pairs = run_on_ranks(_train_both_sides, 1, steps, pooled_last_block)[0]
    ours_first, theirs_first = losses[0]
    assert abs(ours_first - theirs_first) < 1e-5  # same weights, same batch, same loss math
    for ours_loss, their_loss in losses:
        assert math.isfinite(ours_loss) and abs(ours_loss - their_loss) < 1e-4
    assert losses[-1][0] < losses[0][0]  # and both learn
    # Same updates up to rounding. AdamW divides by sqrt(v) + eps, so where the gradient is mostly rounding (the key
    # bias, whose true gradient is exactly zero: the softmax ignores a shift shared by a query's logits) the two
    # sides may move by different small shares of lr. Measured after 4 steps: <= 2.2e-6 = 2.2e-3 lr (token table).
    for name, (mine, other) in pairs.items():
        assert (mine - other).abs().max() < 0.02 * lr, name


@pytest.mark.heavy
def test_bench_prints_one_row_per_repeat_a_median_ratio_and_equal_first_losses():
    out = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "bench_openclip_race.py"), "--model",
                          "clip_tiny", "--batch", "8", "--steps", "1", "--repeats", "2", "--warmup", "1",
                          "--threads", "1"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    top = lines.index(race.TABLE_HEADER) + 2  # the header, then a rule
    bottom = next(i for i, line in enumerate(lines) if line.startswith("median"))
    rows = [line.split() for line in lines[top:bottom]]
    assert [r[0] for r in rows] == ["1", "2"]
    for cells in rows:
        ours, theirs, ratio = float(cells[1]), float(cells[2]), float(cells[3])
        assert ours > 0 and theirs > 0
        # within the rounding of the printed figures (samples/s 2 decimals, ratio 3), at any machine speed
        assert (ours - 0.005) / (theirs + 0.005) - 0.0005 <= ratio <= (ours + 0.005) / max(theirs - 0.005, 1e-9) + 0.0005
    median = next(line.split() for line in lines if line.startswith("median"))
    assert float(median[3]) > 0
    first = next(line for line in lines if line.startswith("same math"))
    ours_first, theirs_first = (float(x) for x in
                                (first.split("ours ")[1].split(",")[0], first.split("OpenCLIP ")[1].split(";")[0]))
    assert abs(ours_first - theirs_first) < 1e-5
