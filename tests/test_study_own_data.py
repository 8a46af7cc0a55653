"""The shipped own-data study (configs/study/own_data.yaml) end to end, as a new user runs it: a folder of images
with a captions CSV without a header row (non-square images, transparency, duplicate and non-ASCII captions and
file names), a held-out folder with class names, templates and labels keyed by file name; make-shards, then the
study at a tiny budget (its AlignCLIP variant and CLIP's IMSep fine-tune need caption embeddings for these shards:
the study makes them; the fine-tune starts from CLIP's final weights), post-hoc maps on CLIP, the report with
per-class recall, majority-class rate and counts; a rerun trains nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.tiny import COLOURS, tiny_overrides

REPO_ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.heavy, pytest.mark.timeout(3600)]  # a hang guard: a loaded 2-core machine is slow

SHAPES = {"square": lambda yy, xx, cy, cx: (abs(yy - cy) < 7) & (abs(xx - cx) < 7),
          "disc": lambda yy, xx, cy, cx: (yy - cy) ** 2 + (xx - cx) ** 2 < 50}


def _image(path: Path, colour: str, shape: str, rng, size: tuple[int, int], alpha: bool) -> None:
    from PIL import Image

    h, w = size
    pixels = np.full((h, w, 4), 240, np.uint8)
    pixels[..., 3] = 255
    yy, xx = np.mgrid[:h, :w]
    cy, cx = rng.integers(8, h - 8), rng.integers(8, w - 8)
    pixels[SHAPES[shape](yy, xx, cy, cx), :3] = COLOURS[colour]
    if alpha:  # a transparent background: make-shards stores the PNG as it is, the loader composes it on white
        pixels[~SHAPES[shape](yy, xx, cy, cx), 3] = 0
    Image.fromarray(pixels, "RGBA" if alpha else None).convert("RGBA" if alpha else "RGB").save(path)


def _user_folder(root: Path) -> None:
    """my_data/ as docs/study.md asks for it."""
    rng = np.random.default_rng(0)
    data = root / "my_data"
    for split, count in (("images", 40), ("heldout", 16)):
        (data / split).mkdir(parents=True)
        rows, labels = [], []
        for i in range(count):
            colour = list(COLOURS)[i % 4] if split == "images" else ["red", "red", "red", "blue"][i % 4]
            shape = list(SHAPES)[(i // 4) % 2]
            alpha = i % 5 == 0
            name = f"{'é' if i % 3 == 0 else ''}img {i}.{'png' if alpha else 'jpg'}"  # non-ASCII, spaces
            size = (40, 56) if i % 2 else (48, 32)  # non-square both ways
            _image(data / split / name, colour, shape, rng, size, alpha)
            caption = f"a {colour} {shape}" if i % 6 else "ein rotes Ding – ça va"  # duplicates, non-ASCII
            rows.append(f'"{name}","{caption}"')
            labels.append(f"{name}\t{colour}")
        text = "\n".join(rows) + "\n"
        if split == "images":
            (data / "captions.csv").write_text(text)  # no header row: the error says so; --no-header reads it
        else:
            (data / "heldout_captions.csv").write_text("image,caption\n" + text)
            (data / "labels.tsv").write_text("\n".join(labels) + "\n")  # unbalanced: 3/4 red
    (data / "classnames.txt").write_text("red\nblue\ngreen\nyellow\n")
    (data / "templates.txt").write_text("a photo of a {c} thing.\na {c} object.\n")


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                DS_ACCELERATOR="cpu")


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=_env(), cwd=cwd, capture_output=True, text=True,
                          timeout=3000)


@pytest.fixture(scope="module")
def own_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    _user_folder(root)
    make = [str(REPO_ROOT / "tools" / "make_shards.py"), "folder", "--samples-per-shard", "20"]
    first = _run(make + ["--images", "my_data/images", "--captions", "my_data/captions.csv", "--out",
                         "my_data/shards"], root)
    assert first.returncode == 2 and "add a header row" in first.stderr and "--no-header" in first.stderr
    assert first.stderr.count("\n") == 1
    for args in (["--images", "my_data/images", "--captions", "my_data/captions.csv", "--out", "my_data/shards",
                  "--no-header"],
                 ["--images", "my_data/heldout", "--captions", "my_data/heldout_captions.csv", "--out",
                  "my_data/heldout_shards"]):
        made = _run(make + args, root)
        assert made.returncode == 0, made.stderr
    # the CPU-sized tiny budget (every run: 40 pairs, batch 8, 2 epochs); the variants keep their own arch / loss
    tiny = [o for o in tiny_overrides({"train": "my_data/shards", "val": ""}, **{
        "train.global_batch_size": 8, "train.epochs": 2, "data.shuffle_buffer": 8, "logging.gap_batch_size": 8,
        "model.text.context_length": 24, "launch.timeout_min": 60}) if not o.startswith(("model.arch=", "loss."))]
    study = [str(REPO_ROOT / "tools" / "study.py"), str(REPO_ROOT / "configs" / "study" / "own_data.yaml"),
             "--seeds", "0", "--output-dir", "out", *tiny]
    proc = _run(study, root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root, study, root / "out" / "own_data"


def test_own_data_study_runs_end_to_end(own_study):
    root, _, out = own_study
    results = json.loads((out / "study_results.json").read_text())
    assert results["variants"] == ["CLIP", "AlignCLIP", "CLIP+IMSep", "CLIP+procrustes", "CLIP+mlp"]
    assert results["runs_summary"] == "3 trained, 0 finished before, 0 failed"
    # the fine-tune started from CLIP's final weights (its export) and trained on (up to 10 steps)
    tuned = out / "runs" / "CLIP+IMSep" / "seed0"
    start = out / "runs" / "CLIP" / "seed0" / "study" / "step_00000010.safetensors"
    assert f"init_from: {start}\n" in (tuned / "config.yaml").read_text() and start.is_file()
    assert json.loads((tuned / "checkpoints" / "step_00000010" / "trainer_state.json").read_text())["step"] == 10
    # the AlignCLIP run trained on caption embeddings the study made for these shards
    config = (out / "runs" / "AlignCLIP" / "seed0" / "config.yaml").read_text()
    assert str(out / "semantic") in config
    measured = results["measurements"]["CLIP"]["0"]["heldout"]
    assert measured["counts"] == {"pairs": 16, "images": 16, "zeroshot_classes/labelled": 16,
                                  "zeroshot_classes/majority_rate": 0.75}  # labels matched by file name
    assert 0 <= measured["tasks"]["zeroshot_classes"]["mean_per_class_recall"] <= 1
    post = results["measurements"]["CLIP+procrustes"]["0"]["heldout"]
    assert post["counts"] == measured["counts"] and post["gap"] != measured["gap"]
    report = (out / "study_report.md").read_text()
    assert "Measured on 16 image-caption pairs of 16 images. Zero-shot classes: 16 labelled images, " \
           "majority-class rate 0.750." in report
    assert "zero-shot classes per-class recall" in report and "post-hoc procrustes on CLIP" in report
    assert (out / "plots" / "heldout" / "tradeoff.png").stat().st_size > 5000


def test_own_data_rerun_trains_and_measures_nothing(own_study):
    root, study, out = own_study
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.json")}
    proc = _run(study, root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 run(s) finished before, 0 to train" in proc.stdout  # the pretraining wave
    assert "1 run(s) finished before, 0 to train" in proc.stdout  # the fine-tune wave
    assert {p: p.stat().st_mtime_ns for p in before} == before  # no measurement written again
