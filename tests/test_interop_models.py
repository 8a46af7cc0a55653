"""Any OpenCLIP / Hugging Face CLIP in, for measuring: alignclip-gap, alignclip-eval and alignclip-distill take a
model saved by open_clip or transformers; the gap report of an OpenCLIP model equals the one of its HF twin."""

import io
import json

import pytest
import torch

from tests.test_interop_init import save_tiny_hf, save_tiny_openclip
from tests.test_interop_preprocess import photo

CAPTIONS = ["a photo.", "a photo.", "a red disc", "Ünïcode café", "a photo.", "a blue bar", "a red disc", "image"]


def _folder(root, count: int = 24):
    """Non-square JPEGs and a captions file with duplicate captions (filename<TAB>caption)."""
    root.mkdir()
    lines = []
    for n in range(count):
        w, h = [(96, 64), (64, 90), (67, 64)][n % 3]
        photo(w, h, n).save(root / f"{n:03d}.jpg", quality=90)
        lines.append(f"{n:03d}.jpg\t{CAPTIONS[n % len(CAPTIONS)]}")
    (root / "captions.tsv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """A tiny OpenCLIP model saved by open_clip and its Hugging Face twin (the same weights, saved by our HF
    export through transformers), and a folder of pictures."""
    from alignclip.export import save_hf
    from alignclip.interop import open_model

    root = tmp_path_factory.mktemp("twins")
    oc = save_tiny_openclip(root / "oc")
    opened = open_model(f"local-dir:{oc}")
    hf = save_hf(opened.model, opened.config, root / "hf")
    return root, oc, hf, _folder(root / "pictures")


def test_the_gap_report_of_an_openclip_model_equals_its_hf_twins(twins, capsys):
    from alignclip.commands.gap_analysis import main

    root, oc, hf, pictures = twins
    out = root / "gap"
    assert main(["--model", f"openclip=local-dir:{oc}", "--model", f"hf={hf}", "--folder", str(pictures),
                 "--captions", str(pictures / "captions.tsv"), "--out", str(out), "--cache-dir",
                 str(root / "cache")]) == 0
    figures = json.loads((out / "gap_metrics.json").read_text())
    a, b = figures["openclip"], figures["hf"]
    numbers = [k for k, v in a.items() if isinstance(v, (int, float))]
    assert len(numbers) > 5 and a["num_pairs"] == 24
    with capsys.disabled():
        print("\n| figure | OpenCLIP | HF twin |\n|---|---|---|")
        for key in numbers:
            print(f"| {key} | {a[key]:.6g} | {b[key]:.6g} |")
    for key in numbers:
        assert a[key] == pytest.approx(b[key], abs=1e-6), key
    assert (root / "cache" / "openclip" / "val" / "image.npy").is_file()


def test_alignclip_eval_and_distill_take_openclip_and_hf_models(twins, capsys):
    from alignclip.commands.distill_aligner import main as distill
    from alignclip.commands.evaluate import main as evaluate

    root, oc, hf, pictures = twins
    results = {}
    for name, spec in (("oc", f"local-dir:{oc}"), ("hf", str(hf))):
        out = root / f"eval_{name}"
        assert evaluate(["--model", spec, "--folder", str(pictures), "--captions",
                         str(pictures / "captions.tsv"), "--out", str(out)]) == 0
        (path,) = out.glob("*retrieval*.json")
        results[name] = json.loads(path.read_text())["metrics"]
    assert results["oc"] == pytest.approx(results["hf"], abs=1e-6)
    assert distill(["--model", str(hf), "--folder", str(pictures), "--captions", str(pictures / "captions.tsv"),
                    "--eval", f"local-dir:{oc}", "--max-epochs", "3", "--out", str(root / "distill")]) == 0
    capsys.readouterr()
    assert any((root / "distill").iterdir())


def test_unknown_or_uncached_models_are_one_line_errors(tmp_path, capsys):
    from alignclip.commands.evaluate import main
    from alignclip.interop import open_model

    with pytest.raises(FileNotFoundError, match="open_clip could not load it"):
        open_model("ViT-B-32:laion2b_s34b_b79k")  # a real tag whose weights are not in this machine's cache
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither an OpenCLIP folder"):
        open_model(str(tmp_path / "empty"))
    assert main(["--model", str(tmp_path / "nowhere"), "--benchmark", "wds", "--root", str(tmp_path),
                 "--out", str(tmp_path / "o")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_an_hf_model_with_another_activation_is_refused_by_name(tmp_path):
    from transformers import CLIPModel

    from alignclip.interop import open_model

    hf = save_tiny_hf(tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    config["text_config"]["hidden_act"] = "gelu_new"
    (hf / "config.json").write_text(json.dumps(config))
    assert CLIPModel.from_pretrained(str(hf)).config.text_config.hidden_act == "gelu_new"
    with pytest.raises(ValueError, match="'gelu' .image. and 'gelu_new' .text."):
        open_model(str(hf))


def test_an_openclip_hf_hub_model_is_read_from_the_local_cache(tmp_path):
    """hf-hub:ORG/NAME resolves in the Hugging Face cache (offline: nothing is downloaded), laid out as the hub
    client lays it out (refs/main -> snapshots/<revision>/...)."""
    import os
    import shutil
    import subprocess
    import sys

    from tests.helpers import REPO_ROOT

    revision = "0" * 40
    snapshot = tmp_path / "hub" / "models--someone--tiny-clip" / "snapshots" / revision
    shutil.copytree(save_tiny_openclip(tmp_path / "oc"), snapshot)
    (tmp_path / "hub" / "models--someone--tiny-clip" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny-clip" / "refs" / "main").write_text(revision)
    code = ("import torch; from alignclip.interop import open_model; import open_clip; "
            "m = open_model('hf-hub:someone/tiny-clip'); t = open_clip.create_model('hf-hub:someone/tiny-clip'); "
            "x = torch.randn(2, 3, 32, 32); t.eval(); "
            "print(m.kind, float((m.model.encode_image(x) - t.encode_image(x)).abs().max()))")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    kind, difference = proc.stdout.split()[-2:]
    assert kind == "openclip" and float(difference) <= 1e-5


def test_a_model_declaring_other_preprocessing_is_refused_by_name(tmp_path):
    from alignclip.interop import open_model

    oc = save_tiny_openclip(tmp_path / "oc")
    config = json.loads((oc / "open_clip_config.json").read_text())
    config["preprocess_cfg"] = {**config.get("preprocess_cfg", {}), "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    (oc / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"mean \[0.5, 0.5, 0.5\]"):
        open_model(f"local-dir:{oc}")
    hf = save_tiny_hf(tmp_path / "hf")
    (hf / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 32},
        "crop_size": {"height": 32, "width": 32}, "resample": 2}))
    with pytest.raises(ValueError, match="PIL resample 2"):
        open_model(str(hf))
    (hf / "preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 32},
                                                             "crop_size": {"height": 32, "width": 32}}))
    assert open_model(str(hf)).kind == "hf"
