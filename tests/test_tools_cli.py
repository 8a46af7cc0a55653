"""The tools end to end on a tiny exported model and a small generated set: gap analysis, evaluation, aligner
distillation against the baselines. (The trained end-to-end run is in docs/analysis.md; here the model is
freshly initialised, so the test pins the plumbing and the outputs, not accuracies.)"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from alignclip.config import load_config
    from alignclip.export import save_exported
    from alignclip.models import build_model

    root = tmp_path_factory.mktemp("tools")
    paths = {}
    for name, cfg in (("clip", "model/clip_tiny"), ("alignclip", "model/alignclip_tiny")):
        config = load_config(cfg, ["data.train=generated", f"data.cache_dir={root / 'data'}",
                                   "data.generated.num_shards=2", "data.generated.samples_per_shard=48",
                                   "data.generated.val_samples=96"])
        torch.manual_seed(0)
        paths[name] = save_exported(build_model(config.model), config, root / f"{name}.safetensors")
    return root, paths


@pytest.mark.heavy
def test_gap_analysis_evaluate_and_distill_tools(exported):
    root, paths = exported
    cache = root / "cache"
    _tool("gap_analysis").main(["--model", f"clip={paths['clip']}", "--model", f"alignclip={paths['alignclip']}",
                                "--out", str(root / "gap"), "--cache-dir", str(cache)])
    figures = json.loads((root / "gap" / "gap_metrics.json").read_text())
    assert set(figures) == {"clip", "alignclip"} and figures["clip"]["num_pairs"] == 96
    assert (root / "gap" / "pca_projection.png").stat().st_size > 0
    assert (cache / "clip" / "val" / "image.npy").is_file()

    _tool("evaluate").main(["--model", str(paths["alignclip"]), "--out", str(root / "eval"), "--name", "tiny"])
    names = sorted(p.name for p in (root / "eval").glob("*.json"))
    assert "generated_tiny_retrieval.json" in names and "generated_tiny_arithmetic.json" in names
    assert "generated_tiny_zeroshot_colour.json" in names and "generated_tiny_linear_probe_shape.json" in names
    zs = json.loads((root / "eval" / "generated_tiny_zeroshot_colour.json").read_text())
    assert set(zs["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}

    _tool("distill_aligner").main(["--fit", str(paths["clip"]), "--out", str(root / "aligner"), "--max-epochs", "3",
                                   "--hidden", "32", "--recipe", "mlp_cos:cos=1",
                                   "--recipe", "mlp_all:cos=1,clip=1,imsep=0.5"])
    rows = json.loads((root / "aligner" / "aligner_comparison.json").read_text())
    assert set(rows) == {"identity", "mean_shift", "mean_centering", "procrustes", "mlp_cos", "mlp_all"}
    assert rows["mean_centering"]["gap"]["centroid_distance"] < rows["identity"]["gap"]["centroid_distance"]
    assert "arithmetic" in rows["mlp_cos"]["tasks"]
    # the saved aligner evaluates as a wrapper of the image encoder
    _tool("evaluate").main(["--model", str(cache / "clip" / "val"), "--aligner",
                            str(root / "aligner" / "mlp_cos.safetensors"), "--out", str(root / "eval_aligned"),
                            "--name", "clip+mlp"])
    assert (root / "eval_aligned" / "generated_clip_mlp_retrieval.json").is_file()
