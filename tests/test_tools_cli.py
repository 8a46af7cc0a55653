"""The tools end to end: tiny CLIP and AlignCLIP trained a few steps by the real trainer (DeepSpeed, generated
data), then export, gap analysis side by side, evaluation, aligner distillation against the baselines. A few steps
teach nothing, so this pins the chain and its outputs; the accuracies of a longer run are in docs/analysis.md."""

import json

import pytest

from tests.helpers.ranks import run_on_ranks
from tests.helpers.tools import command


def _run(name: str, argv: list[str]) -> None:
    """The command as a user runs it; it must exit 0."""
    assert command(name)(argv) == 0, f"{name} {argv} failed"


def _train_tiny(rank, world_size, root: str):
    from alignclip.config import load_config
    from alignclip.training.trainer import train

    steps = {}
    for name, cfg in (("clip", "model/clip_tiny"), ("alignclip", "model/alignclip_tiny")):
        config = load_config(cfg, [f"name={name}", f"output_dir={root}/runs", "data.train=generated",
                                   f"data.cache_dir={root}/data", "data.generated.num_shards=2",
                                   "data.generated.samples_per_shard=48", "data.generated.val_samples=96",
                                   "data.workers=1", "train.global_batch_size=16", "train.max_steps=3",
                                   "optim.warmup_steps=1", "logging.progress_bar=false", "logging.tensorboard=false",
                                   "logging.gap_batch_size=16"])
        steps[name] = train(config).step
    return steps


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("tools")
    (steps,) = run_on_ranks(_train_tiny, 1, str(root))
    assert steps == {"clip": 3, "alignclip": 3}
    return root


@pytest.mark.heavy
def test_gap_analysis_evaluate_and_distill_tools(trained):
    root = trained
    paths = {name: root / "exported" / f"{name}.safetensors" for name in ("clip", "alignclip")}
    _run("export", [str(root / "runs" / "clip"), str(paths["clip"])])
    cache = root / "cache"
    _run("gap_analysis", ["--model", f"clip={paths['clip']}",
                                "--model", f"alignclip={root / 'runs' / 'alignclip'}",  # a run dir: exported here
                                "--out", str(root / "gap"), "--cache-dir", str(cache), "--trust-checkpoint"])
    figures = json.loads((root / "gap" / "gap_metrics.json").read_text())
    assert set(figures) == {"clip", "alignclip"} and figures["clip"]["num_pairs"] == 96
    assert figures["clip"]["data_source"] == figures["alignclip"]["data_source"] != "unknown"
    assert (root / "gap" / "pca_projection.png").stat().st_size > 0
    assert (cache / "clip" / "val" / "image.npy").is_file()
    assert (cache / "alignclip.safetensors").is_file()  # the run directory was exported on the fly
    paths["alignclip"] = cache / "alignclip.safetensors"

    # a zero-shot task from plain files on top of the built-in ones: the objects' size
    tasks = json.loads(next((root / "data").rglob("tasks.json")).read_text())
    sizes = tasks["classes"]["size"]
    (root / "sizes.txt").write_text("\n".join(sizes) + "\n")
    (root / "size_templates.txt").write_text("a {c} shape\na {c} object\n")
    (root / "size_labels.tsv").write_text("".join(f"{key}\t{sizes[lab['size']]}\n"
                                                  for key, lab in tasks["val_labels"].items()))
    _run("evaluate", ["--model", str(paths["alignclip"]), "--out", str(root / "eval"), "--name", "tiny",
                            "--classnames", str(root / "sizes.txt"), "--templates", str(root / "size_templates.txt"),
                            "--labels", str(root / "size_labels.tsv")])
    names = sorted(p.name for p in (root / "eval").glob("*.json"))
    assert "generated_tiny_zeroshot_retrieval.json" in names and "generated_tiny_arithmetic.json" in names
    assert "generated_tiny_zeroshot_classification_colour.json" in names
    assert "generated_tiny_zeroshot_classification_classes.json" in names  # from the plain files
    assert not [n for n in names if "linear_probe" in n]  # no train split given: no probe on the test set
    zs = json.loads((root / "eval" / "generated_tiny_zeroshot_classification_colour.json").read_text())
    assert set(zs["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert {"dataset", "model", "pretrained", "task", "metrics", "language"} <= set(zs)
    assert (root / "eval" / "results.csv").is_file() and (root / "eval" / "results.md").is_file()

    _run("distill_aligner", ["--fit", str(paths["clip"]), "--out", str(root / "aligner"), "--max-epochs", "3",
                                   "--hidden", "32", "--recipe", "mlp_cos:cos=1",
                                   "--recipe", "mlp_all:cos=1,clip=1,imsep=0.5"])
    rows = json.loads((root / "aligner" / "aligner_comparison.json").read_text())
    assert set(rows) == {"identity", "mean_shift", "mean_centering", "procrustes", "mlp_cos", "mlp_all"}
    assert rows["mean_centering"]["gap"]["centroid_distance"] < rows["identity"]["gap"]["centroid_distance"]
    assert "arithmetic" in rows["mlp_cos"]["tasks"]
    # the saved aligner evaluates as a wrapper of the image encoder
    _run("evaluate", ["--model", str(cache / "clip" / "val"), "--aligner",
                            str(root / "aligner" / "mlp_cos.safetensors"), "--out", str(root / "eval_aligned"),
                            "--name", "clip+mlp"])
    assert (root / "eval_aligned" / "generated_clip_mlp_zeroshot_retrieval.json").is_file()
    # ... and loads as a wrapper of the exported model's image encoder
    import torch

    from alignclip.aligner.mlp import load_aligned

    wrapped, tokenizer, _ = load_aligned(paths["clip"], root / "aligner" / "mlp_cos.safetensors")
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(wrapped.aligner(wrapped.model.encode_image(images, normalize=True)),
                                                 dim=-1)
        torch.testing.assert_close(wrapped.encode_image(images, normalize=True), expected)
        assert wrapped(images, tokenizer(["a red circle", "a blue square"]))["text_embeds"].shape == (2, 64)
    _run("gap_analysis", ["--model", f"clip={cache / 'clip' / 'val'}", "--aligner",
                                f"clip={root / 'aligner' / 'mlp_cos.safetensors'}", "--out", str(root / "gap2")])
    figures = json.loads((root / "gap2" / "gap_metrics.json").read_text())
    assert set(figures) == {"clip", "clip+mlp_cos"}
