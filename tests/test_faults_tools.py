"""Tools verify what they read: export (and every tool that reads a run folder through it) checks the checkpoint
manifest as resume does and falls back to the newest checkpoint that verifies; a damaged step directory given
itself, or a run with no intact checkpoint, is one line and exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO_ROOT
from tests.helpers.ranks import run_on_ranks


def _two_checkpoints(rank, world_size, run_dir: str):
    """A tiny CLIP trained under DeepSpeed (ZeRO 1), saved by the trainer's save at steps 2 and 4; returns the
    module's weights at each save."""
    from alignclip.config import load_config, save_config
    from alignclip.losses import build_objective
    from alignclip.models import build_model
    from alignclip.checkpoints import TrainerState
    from alignclip.training.checkpoint import save_checkpoint
    from alignclip.training.deepspeed_config import build_deepspeed_config
    from alignclip.training.engine import initialize_engine

    config = load_config("model/clip_tiny", ["deepspeed.zero_stage=1", "train.global_batch_size=4",
                                             f"run_dir={run_dir}", "fast_path.precision=fp32"])
    torch.manual_seed(0)
    model = build_model(config.model)
    objective = build_objective(config.loss)
    engine = initialize_engine(model, torch.optim.AdamW(model.parameters(), lr=1e-2),
                               build_deepspeed_config(config, world_size, "cpu"))
    save_config(config, config.run_dir)
    weights = {}
    for step in range(1, 5):
        images = torch.randn(4, 3, 64, 64)
        tokens = torch.randint(1, 400, (4, config.model.text.context_length))
        tokens[:, -1] = 49407
        out = engine(images, tokens)
        engine.backward(objective(out["image_embeds"], out["text_embeds"], out["log_logit_scale"]).total)
        engine.step()
        if step % 2 == 0:
            save_checkpoint(engine, config.run_dir, TrainerState(step=step, world_size=world_size), keep=3)
            weights[step] = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    return weights


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(pristine run folder, weights at steps 2 and 4); each test damages its own copy."""
    run = tmp_path_factory.mktemp("export") / "run"
    (weights,) = run_on_ranks(_two_checkpoints, 1, str(run))
    return run, weights


def _copy(run: Path, tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def _overwrite_middle(path: Path, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + n] = b"\x7f" * n  # bytes inside the tensor data: torch still loads the file
    path.write_bytes(bytes(data))


def _export(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "alignclip.commands.export", *map(str, argv)], capture_output=True,
                          text=True, cwd=REPO_ROOT)


@pytest.mark.parametrize("damage", ["bytes overwritten", "truncated"])
def test_export_of_a_run_with_a_damaged_newest_checkpoint_exports_the_older_one_and_names_the_file(
        trained, tmp_path, damage):
    from alignclip.export import load_model

    pristine, weights = trained
    run = _copy(pristine, tmp_path)
    model_file = run / "checkpoints" / "step_00000004" / "mp_rank_00_model_states.pt"
    if damage == "truncated":
        model_file.write_bytes(model_file.read_bytes()[:-4096])
    else:
        _overwrite_middle(model_file)
    proc = _export(run, tmp_path / "out.safetensors")
    assert proc.returncode == 0, proc.stderr
    assert "step_00000002, an OLDER checkpoint" in proc.stderr and str(model_file) in proc.stderr
    model, _ = load_model(tmp_path / "out.safetensors")
    exported = model.state_dict()
    # was: exit 0 with the damaged weights (bytes overwritten) or a torch traceback (truncated)
    assert all(torch.equal(exported[k], weights[2][k].float()) for k in exported)


def test_a_damaged_step_directory_or_a_run_without_an_intact_checkpoint_is_one_line_exit_2(trained, tmp_path):
    pristine, _ = trained
    run = _copy(pristine, tmp_path)
    for step in ("step_00000002", "step_00000004"):
        _overwrite_middle(run / "checkpoints" / step / "mp_rank_00_model_states.pt")
    step_dir = run / "checkpoints" / "step_00000004"
    for source, expected in ((step_dir, f"checkpoint {step_dir} does not verify"),
                             (run, f"no checkpoint in {run / 'checkpoints'} verifies (2 tried)")):
        proc = _export(source, tmp_path / "out.safetensors")
        assert proc.returncode == 2, proc.stderr
        assert expected in proc.stderr and "SHA-256 differs" in proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "out.safetensors").exists()


def test_the_verified_read_is_read_only_and_takes_latest_first(trained, tmp_path):
    from alignclip.checkpoints import newest_verified

    pristine, _ = trained
    run = _copy(pristine, tmp_path)
    (run / "checkpoints" / "step_00000006.tmp").mkdir()  # a crashed save's leftover: a tool must not delete it
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert newest_verified(run).name == "step_00000004"
    (run / "checkpoints" / "latest").write_text("step_00000002\n")
    assert newest_verified(run).name == "step_00000002"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def test_evaluation_on_a_one_class_folder_writes_null_not_nan_and_says_top5_is_undefined(tmp_path, caplog):
    import json

    import numpy as np
    from PIL import Image

    from alignclip.commands.evaluate import main
    from tests.helpers.tiny import export_untrained, tiny_overrides

    model = export_untrained(tmp_path / "m.safetensors", tiny_overrides("unused"))
    (tmp_path / "val" / "red").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(tmp_path / "val" / "red" / f"{i}.png")
    assert main(["--model", str(model), "--benchmark", "imagefolder", "--root", str(tmp_path / "val"),
                 "--workers", "0", "--out", str(tmp_path / "out")]) == 0
    (path,) = (tmp_path / "out").glob("*zeroshot*.json")
    text = path.read_text()
    record = json.loads(text, parse_constant=lambda c: pytest.fail(f"{path} holds a bare {c}"))  # was: NaN
    assert record["metrics"]["acc5"] is None and record["metrics"]["acc1"] == 1.0
    assert "fewer than 5 classes" in record["undefined_metrics"]["acc5"]
    assert "acc5: top-5 is undefined" in caplog.text
