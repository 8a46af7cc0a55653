"""A tiny study end to end through the real trainer and the submitit local executor: 2 variants x 2 seeds, the
report and results; a rerun that trains nothing; a study killed halfway that, restarted, gives the same results."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.heavy, pytest.mark.timeout(5400)]  # a hang guard: a loaded 2-core machine is slow


def _study_file(tmp: Path, data_dir: Path, name: str) -> Path:
    tiny = {"model.embed_dim": 32, "model.vision.image_size": 32, "model.vision.patch_size": 8,
            "model.vision.width": 32, "model.vision.layers": 1, "model.vision.heads": 2, "model.text.width": 32,
            "model.text.layers": 1, "model.text.heads": 2, "model.text.context_length": 24,
            "data.cache_dir": str(data_dir), "data.workers": 0, "data.shuffle_buffer": 16,
            "data.generated.num_shards": 2, "data.generated.samples_per_shard": 32, "data.generated.image_size": 32,
            "data.generated.val_samples": 32, "train.global_batch_size": 16, "train.epochs": 4, "train.max_steps": 0,
            "optim.warmup_steps": 1, "checkpoint.every_steps": 2, "checkpoint.keep": 5,
            "logging.log_every_steps": 1, "logging.gap_every_steps": 2, "logging.gap_batch_size": 16,
            "logging.progress_bar": False, "launch.executor": "local", "launch.gpus_per_node": 0,
            "launch.tasks_per_node": 1, "launch.timeout_min": 60}
    raw = {"name": name, "output_dir": str(tmp), "executor": "local", "seeds": [0, 1], "baseline": "CLIP",
           "overrides": [f"{k}={v}" for k, v in tiny.items()],
           "variants": [{"name": "CLIP", "configs": ["experiment/embedded_clip"]},
                        {"name": "AlignCLIP", "configs": ["experiment/embedded_default"],
                         "overrides": ["loss.imsep_start_step=2", "loss.imsep_ramp_steps=2"]}],  # within 16 steps
           "eval_sets": [{"name": "gen-val", "data": "generated", "split": "val", "probe_split": "train"}]}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                DS_ACCELERATOR="cpu")


def _run_study(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "study.py"), str(path)], env=_env(),
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=3000)


def _checkpoint_files(study_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(study_dir)): p.stat().st_mtime_ns
            for p in (study_dir / "runs").rglob("checkpoints/**/*") if p.is_file()}


def _figures(results: dict) -> dict:
    """The measured numbers only (no paths, statuses or wall times)."""
    return {"measurements": results["measurements"], "aggregate": results["aggregate"]}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    path = _study_file(tmp, tmp / "data", "tiny")
    proc = _run_study(path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp, path, tmp / "tiny"


def test_tiny_study_trains_measures_and_reports(study):
    _, _, out = study
    results = json.loads((out / "study_results.json").read_text())
    assert results["runs_summary"] == "4 trained, 0 finished before, 0 failed"
    assert sorted((r["variant"], r["seed"]) for r in results["runs"]) == \
        [("AlignCLIP", 0), ("AlignCLIP", 1), ("CLIP", 0), ("CLIP", 1)]
    for variant in ("CLIP", "AlignCLIP"):
        for seed in (0, 1):
            run = out / "runs" / variant / f"seed{seed}"
            state = json.loads((run / "checkpoints" / "step_00000016" / "trainer_state.json").read_text())
            assert state["step"] == 16  # 4 epochs of 64 samples in batches of 16
            assert (run / "study_done.json").is_file() and list((run / "tb").rglob("events.out.tfevents.*"))
    agg = results["aggregate"]["gen-val"]
    align = agg["summary"]["gap/alignment_score"]
    assert set(align) == {"CLIP", "AlignCLIP"} and align["CLIP"]["n"] == 2
    values = agg["values"]["gap/alignment_score"]
    diff = agg["difference"]["gap/alignment_score"]["AlignCLIP"]
    by_hand = [values["AlignCLIP"][s] - values["CLIP"][s] for s in ("0", "1")]  # JSON keys
    assert diff["mean"] == pytest.approx(sum(by_hand) / 2) and diff["n"] == 2 and diff["low"] <= diff["high"]
    for metric in ("zeroshot_colour/acc1", "zeroshot_shape/acc1", "retrieval/text_retrieval_recall@1",
                   "gap/linear_separability", "gap/uniformity", "gap/rmg_l2"):
        assert set(agg["summary"][metric]) == {"CLIP", "AlignCLIP"}, metric
    # linear probes fit on the generated train split and score on val (CLIP_benchmark's protocol)
    for metric in ("linear_probe_colour/acc1", "linear_probe_shape/acc1"):
        assert set(agg["summary"][metric]) == {"CLIP", "AlignCLIP"}, metric
    curves = results["curves"]["AlignCLIP"]["1"]
    assert [s for s, _ in curves["loss/total"]] == list(range(1, 17))
    assert [s for s, _ in curves["gap/alignment_score"]][-1] == 16
    report = (out / "study_report.md").read_text()
    assert "### Modality gap (Table 1 layout)" in report and "### Difference to CLIP" in report
    seeds = " / ".join(f"{values['AlignCLIP'][s]:.3f}" for s in ("0", "1"))
    assert "### Per seed (0, 1)" in report and f"| AlignCLIP | {seeds} |" in report
    for png in ("plots/gen-val/cosine_cdf.png", "plots/gen-val/pca_projection.png", "plots/training_curves.png"):
        assert (out / png).stat().st_size > 1000 and f"]({png})" in report
    # each eval set (and its probe's train split) encoded once per model: two embedding folders per run
    assert len(list((out / "runs").glob("*/*/study/embeddings/*"))) == 8


def test_rerun_trains_nothing(study):
    _, path, out = study
    before = _checkpoint_files(out)
    first = json.loads((out / "study_results.json").read_text())
    proc = _run_study(path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 run(s) finished before, 0 to train" in proc.stdout
    assert _checkpoint_files(out) == before  # no checkpoint written or touched
    again = json.loads((out / "study_results.json").read_text())
    assert again["runs_summary"] == "0 trained, 4 finished before, 0 failed"
    assert _figures(again) == _figures(first)


def test_study_killed_halfway_completes_with_the_same_results(study):
    tmp, _, reference = study
    path = _study_file(tmp, tmp / "data", "killed")
    out = tmp / "killed"
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "tools" / "study.py"), str(path)], env=_env(),
                            cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    # kill the study (and its local job) while the third run is mid-way: a checkpoint written, not finished
    third = out / "runs" / "AlignCLIP" / "seed0"
    deadline = time.monotonic() + 1500  # a hang guard only
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if (third / "checkpoints" / "latest").is_file():
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the study ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert not (third / "study_done.json").is_file()
    assert (out / "runs" / "CLIP" / "seed1" / "study_done.json").is_file()
    restarted = _run_study(path)
    assert restarted.returncode == 0, restarted.stdout[-3000:] + restarted.stderr[-3000:]
    results = json.loads((out / "study_results.json").read_text())
    assert results["runs_summary"] == "2 trained, 2 finished before, 0 failed"
    assert "resum" in (third / "train.log").read_text().lower()  # the third run continued from its checkpoint
    assert _figures(results) == _figures(json.loads((reference / "study_results.json").read_text()))
