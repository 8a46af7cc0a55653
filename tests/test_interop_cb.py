"""CLIP_benchmark's CLI, unmodified, on an OpenCLIP export, and alignclip-eval on the same data: identical figures,
on webdatasets of non-square JPEGs with duplicate captions (the ties on which a tie-aware recall and CB's topk part
ways)."""

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.helpers.tiny import perturbed_model
from tests.test_interop_preprocess import photo

CLASSES = ["red", "green", "blue", "yellow", "cyan", "magenta"]
TEMPLATES = ["a photo of a {c} thing.", "it is {c}."]
SHAPES = [(600, 393), (393, 600), (67, 64), (120, 90), (90, 121), (64, 64)]
# alt-text style: most images share one of a few generic captions, some of them non-ASCII
GENERIC = ["a photo.", "image", "a photo.", "Фото", "untitled", "a photo."]


def _jpeg(n: int) -> bytes:
    w, h = SHAPES[n % len(SHAPES)]
    out = io.BytesIO()
    photo(w, h, n).save(out, format="JPEG", quality=90)
    return out.getvalue()


def _write(root, kind: str, count: int, shards: int, fields) -> None:
    import webdataset as wds

    (root / "test").mkdir(parents=True)
    for shard in range(shards):
        with wds.TarWriter(str(root / "test" / f"{shard}.tar")) as sink:
            for n in range(shard, count, shards):
                sink.write({"__key__": f"s{n:04d}", "jpg": _jpeg(n), **fields(n)})
    (root / "test" / "nshards.txt").write_text(str(shards))
    (root / "dataset_type.txt").write_text(kind)
    if kind == "classification":
        (root / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
        (root / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")


@pytest.fixture(scope="module", params=["model/clip_tiny", "experiment/embedded_default"])
def setup(request, tmp_path_factory):
    """A perturbed tiny CLIP (patch stem) or `make run`'s AlignCLIP (hybrid stem: OpenCLIP's timm tower) exported as
    OpenCLIP folder and as ours; a classification wds whose labels are the model's own prediction for every other
    image (so accuracies are far from 0 and 1), and a retrieval wds with two captions per image, 2 of 3 of the first
    ones duplicates."""
    from PIL import Image

    from alignclip.data.transforms import ImageTransform
    from alignclip.embeddings import encode_texts
    from alignclip.prompts import build_classifier
    from alignclip.export import save_exported, save_openclip
    from alignclip.tokenizer import get_tokenizer

    root = tmp_path_factory.mktemp("cb")
    model, config = perturbed_model(request.param)
    save_exported(model, config, root / "ours.safetensors")
    save_openclip(model, config, root / "oc")
    count = 60
    with torch.no_grad():
        pixels = ImageTransform(64)([Image.open(io.BytesIO(_jpeg(n))) for n in range(count)])
        tokenizer = get_tokenizer(config.model.text.context_length)
        weights = build_classifier(lambda t: encode_texts(model, tokenizer, t), CLASSES, TEMPLATES)
        predicted = (model.encode_image(pixels, normalize=True).numpy() @ weights.T).argmax(1)
    labels = [int(p) if n % 2 else int(p + 1) % len(CLASSES) for n, p in enumerate(predicted)]
    _write(root / "wds_cls", "classification", count, 2, lambda n: {"cls": str(labels[n])})
    _write(root / "wds_ret", "retrieval", count, 2,
           lambda n: {"txt": f"{GENERIC[n % len(GENERIC)] if n % 3 else f'a picture, number {n}'}\n"
                             f"photo {n % 9}"})
    return root


def _clip_benchmark(root, dataset: str, task: str) -> dict:
    """The documented command (docs/analysis.md), as a subprocess."""
    out = root / f"cb_{task}.json"
    cmd = [sys.executable, "-m", "clip_benchmark.cli", "eval", "--model", f"local-dir:{root / 'oc'}",
           "--pretrained", "oc", "--dataset", f"wds/{dataset}", "--dataset_root", str(root / dataset),
           "--task", task, "--no_amp", "--output", str(out), "--recall_k", "1", "5", "10", "--num_workers", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["pretrained"] == "oc" and record["task"] == task
    return record["metrics"]


def _alignclip_eval(root, model: str, dataset: str, capsys) -> dict:
    from alignclip.commands.evaluate import main

    out = root / f"ours_{dataset}_{model.replace(':', '_').replace('/', '_')}"
    assert main(["--model", model, "--benchmark", "wds", "--root", str(root / dataset), "--out", str(out)]) == 0
    capsys.readouterr()
    (result,) = [json.loads(p.read_text()) for p in out.glob("*.json")]
    return result["metrics"]


@pytest.mark.parametrize("dataset,task", [("wds_cls", "zeroshot_classification"),
                                          ("wds_ret", "zeroshot_retrieval")])
def test_clip_benchmark_cli_and_alignclip_eval_agree_on_every_metric(setup, dataset, task, capsys):
    root = setup
    theirs = _clip_benchmark(root, dataset, task)
    rows = []
    for model in (f"local-dir:{root / 'oc'}", str(root / "ours.safetensors")):
        ours = _alignclip_eval(root, model, dataset, capsys)
        assert set(theirs) <= set(ours)
        rows += [(model.rsplit("/", 1)[-1], key, ours[key], theirs[key]) for key in theirs]
    with capsys.disabled():
        print(f"\n| model | metric | alignclip-eval | CLIP_benchmark | difference |\n|---|---|---|---|---|")
        for model, key, a, b in rows:
            print(f"| {model} | {key} | {a:.6f} | {b:.6f} | {abs(a - b):.1e} |")
        if task == "zeroshot_retrieval":
            print("tie-aware:", {k: round(v, 4) for k, v in ours.items() if "tie_aware" in k})
    for model, key, a, b in rows:
        assert a == pytest.approx(b, abs=1e-6, nan_ok=True), (model, key)
    if task == "zeroshot_retrieval":  # the data has ties that matter: the tie-aware figures differ
        assert any(abs(ours[k.replace("@", "_tie_aware@")] - ours[k]) > 1e-3 for k in theirs)
        assert 0 < ours["text_retrieval_recall@5"] < 1
    else:
        assert 0.3 < ours["acc1"] < 0.7 and not np.isnan(ours["acc5"])
