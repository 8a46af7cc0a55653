"""`make run`'s command end to end at a toy size: data rendered (generator v2), captions embedded for AlignCLIP,
CLIP and AlignCLIP trained, exported, measured and printed side by side with the plots' paths."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.heavy
@pytest.mark.timeout(3600)  # a hang guard: a loaded 2-core machine is slow
def test_run_default_trains_both_and_prints_them_side_by_side(tmp_path):
    overrides = [f"data.cache_dir={tmp_path / 'data'}", "data.workers=0",
                 "data.generated.num_shards=2", "data.generated.samples_per_shard=64",
                 "data.generated.val_samples=64", "train.global_batch_size=32", "train.max_steps=4",
                 "optim.warmup_steps=2", "logging.gap_batch_size=32", "logging.progress_bar=false",
                 "model.vision.width=32", "model.vision.layers=1", "model.text.width=32", "model.text.layers=1",
                 "model.embed_dim=32", "loss.imsep_start_step=1", "loss.imsep_ramp_steps=2"]  # IMSep within 4 steps
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu")
    out = tmp_path / "embedded"
    proc = subprocess.run([sys.executable, "-m", "alignclip.run_default", "--out", str(out), *overrides], env=env,
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    assert any(line.split() == ["CLIP", "AlignCLIP"] for line in text.splitlines())  # the table's header
    for row in ("alignment (mean paired cosine", "L2M (centroid distance", "linear separability",
                "zero-shot colour top-1 (chance 0.167)", "zero-shot shape top-1 (chance 0.200)",
                "retrieval image->text R@1", "retrieval text->image R@1", "linear probe colour top-1",
                "linear probe shape top-1", "wall time"):
        line = next((line for line in text.splitlines() if line.startswith(row)), None)
        assert line is not None, row
        assert len(line[len(row):].split()) >= 2  # a figure per model
    for png in ("cosine_cdf.png", "pca_projection.png", "explained_variance.png"):
        assert str(out / "gap" / png) in text and (out / "gap" / png).stat().st_size > 1000
    for run in ("clip", "alignclip"):
        assert (out / run / "checkpoints" / "step_00000004" / "trainer_state.json").is_file()
        assert (out / run / "export" / "step_00000004.safetensors").is_file()
        assert f"tensorboard --logdir {out / run / 'tb'}" in text
    assert list((tmp_path / "data").glob("v3-*/semantic-*/train-00000.sem.npz"))  # the precomputed path
    assert "v3-seed0" in text  # the default is generator v3

    again = subprocess.run([sys.executable, "-m", "alignclip.run_default", "--out", str(out), "--only", "clip",
                            *overrides], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "4 steps" in again.stdout  # resumed at its end: nothing trained, the same checkpoint measured


def test_run_default_config_error_exits_2_before_training(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu")
    proc = subprocess.run([sys.executable, "-m", "alignclip.run_default", "--out", str(tmp_path), "train.lrr=1"],
                          env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "train.lrr" in proc.stderr
    assert not any(tmp_path.iterdir())


def test_a_run_folder_of_another_model_is_set_aside_and_the_same_run_resumes(tmp_path, capsys):
    """`make run` after the embedded default changed (the conv stem's runs/embedded): the old run folder is kept
    under another name and the model trained anew, where a resume would refuse the changed model (exit 2)."""
    from dataclasses import replace

    from alignclip.config import load_config, save_config
    from alignclip.run_default import set_aside_if_other

    run_dir = tmp_path / "embedded" / "clip"
    earlier = load_config("experiment/embedded_clip", ["model.vision.stem=conv", "model.vision.stem_channels=128",
                                                       f"run_dir={run_dir}"])
    save_config(earlier, run_dir)
    (run_dir / "checkpoints").mkdir()
    assert set_aside_if_other(run_dir, earlier) is None  # the same run: resumed as before
    assert set_aside_if_other(run_dir, replace(earlier, logging=replace(earlier.logging, log_every_steps=3))) is None
    now = load_config("experiment/embedded_clip", [f"run_dir={run_dir}"])
    aside = set_aside_if_other(run_dir, now)
    assert aside is not None and aside.name.startswith("clip.earlier-") and not run_dir.exists()
    assert (aside / "config.yaml").is_file() and (aside / "checkpoints").is_dir()  # nothing lost
    out = capsys.readouterr().out
    assert "model.vision.stem: 'conv' -> 'hybrid'" in out and str(aside) in out
    assert set_aside_if_other(run_dir, now) is None  # nothing left to resume
    save_config(earlier, run_dir)  # and again within the same second: another name, nothing overwritten
    again = set_aside_if_other(run_dir, now)
    assert again is not None and again != aside and aside.is_dir() and (again / "config.yaml").is_file()
