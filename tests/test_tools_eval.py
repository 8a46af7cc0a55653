"""Evaluation on embeddings with hand-checkable answers: zero-shot, retrieval, linear probe, arithmetic."""

import json

import numpy as np
import pytest

from alignclip.eval.arithmetic import arithmetic_queries, arithmetic_retrieval, simat_score
from alignclip.eval.linear_probe import linear_probe
from alignclip.eval.results import write_result
from alignclip.eval.retrieval import retrieval_metrics
from alignclip.eval.zeroshot import classification_metrics, zero_shot_classification
from alignclip.prompts import class_prompts, ensemble_class_embeddings


def test_prompt_ensemble_averages_normalised_templates():
    assert class_prompts(["cat", "dog"], ["a {c}.", "photo of {}"]) == ["a cat.", "photo of cat", "a dog.",
                                                                         "photo of dog"]
    prompts = np.array([[2.0, 0.0], [0.0, 1.0], [0.0, -3.0], [-1.0, 0.0]])  # class-major, 2 templates
    w = ensemble_class_embeddings(prompts, 2)
    np.testing.assert_allclose(w, [[np.sqrt(0.5), np.sqrt(0.5)], [-np.sqrt(0.5), -np.sqrt(0.5)]])


def test_classification_metrics_top1_top5_and_balanced_recall():
    logits = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.8, 0.05, 0.15], [0.1, 0.2, 0.7]])
    labels = [0, 1, 1, 2]  # third sample wrong at top-1, right at top-3
    out = classification_metrics(logits, labels, ks=(1, 2, 5))
    assert out["acc1"] == pytest.approx(0.75)
    assert out["acc2"] == pytest.approx(0.75)
    assert np.isnan(out["acc5"])  # CLIP_benchmark: no top-5 accuracy below 5 classes
    assert out["mean_per_class_recall"] == pytest.approx((1 + 0.5 + 1) / 3)


def test_zero_shot_with_exact_class_directions_is_perfect():
    classes = np.eye(4)
    labels = np.array([0, 1, 2, 3, 2, 1])
    images = classes[labels] + 0.1
    assert zero_shot_classification(images, labels, classes)["acc1"] == 1.0


def test_retrieval_with_several_captions_per_image():
    img = np.eye(3)
    # captions 0,1 describe image 0; caption 2 image 1; caption 3 image 2 but points at image 1
    txt = np.array([[1.0, 0.1, 0], [0.9, 0, 0.2], [0, 1.0, 0], [0, 1.0, 0.5]])
    out = retrieval_metrics(img, txt, text_to_image=[0, 0, 1, 2], ks=(1, 2))
    assert out["image_retrieval_recall@1"] == pytest.approx(3 / 4)  # caption 3 retrieves image 1 first
    assert out["image_retrieval_recall@2"] == pytest.approx(1.0)
    # image queries on normalised rows: image 1 scores its caption 2 (1.0) above caption 3 (0.89); each image
    # finds one of its captions first
    assert out["text_retrieval_recall@1"] == pytest.approx(1.0)
    ident = retrieval_metrics(np.eye(5), np.eye(5))
    assert ident["image_retrieval_recall@1"] == ident["text_retrieval_recall@1"] == 1.0


def test_linear_probe_separates_clusters():
    rng = np.random.default_rng(0)
    centres = 4 * np.eye(6)[:3]
    ytr, yte = rng.integers(0, 3, 150), rng.integers(0, 3, 60)
    out = linear_probe(centres[ytr] + rng.normal(size=(150, 6)) * 0.3, ytr,
                       centres[yte] + rng.normal(size=(60, 6)) * 0.3, yte)
    assert out["acc1"] == 1.0


def test_arithmetic_retrieves_the_target_when_text_deltas_match_image_deltas():
    rng = np.random.default_rng(1)
    attr = {"red": rng.normal(size=16), "blue": rng.normal(size=16)}
    objs = [rng.normal(size=16) for _ in range(5)]
    gallery = np.array([o + attr[a] for o in objs for a in ("red", "blue")])  # image 2k red, 2k+1 blue
    src = np.arange(0, 10, 2)
    out = arithmetic_retrieval(gallery, src, np.tile(attr["red"], (5, 1)), np.tile(attr["blue"], (5, 1)),
                               target_index=src + 1, lam=1.0)
    assert out["arithmetic_recall@1"] == 1.0
    relevance = np.zeros((5, 10))
    relevance[np.arange(5), src + 1] = 1.0
    assert simat_score(gallery, src, np.tile(attr["red"], (5, 1)), np.tile(attr["blue"], (5, 1)), relevance) == 100.0
    # lambda = 0 never leaves the source, which is excluded: the target is then found only by chance
    assert np.allclose(np.linalg.norm(arithmetic_queries(gallery[src], gallery[src], gallery[src]), axis=1), 1.0)


def test_result_json_layout(tmp_path):
    path = write_result(tmp_path, "generated", "tiny clip", "zeroshot_classification", {"acc1": 0.5}, lam=1.0)
    record = json.loads(path.read_text())
    assert record == {"dataset": "generated", "model": "tiny clip", "pretrained": "",
                      "task": "zeroshot_classification", "metrics": {"acc1": 0.5}, "language": "en", "lam": 1.0}


def test_retrieval_across_similarity_blocks_counts_each_match_once():
    rng = np.random.default_rng(2)
    img = rng.normal(size=(2100, 16)).astype(np.float32)  # more rows than one similarity block
    owner = np.repeat(np.arange(2100), 2)
    out = retrieval_metrics(img, img[owner], text_to_image=owner, ks=(1,))
    assert out["image_retrieval_recall@1"] == 1.0 and out["text_retrieval_recall@1"] == 1.0
    shuffled = retrieval_metrics(img, img[rng.permutation(2100)], ks=(1,))
    assert shuffled["image_retrieval_recall@1"] < 0.01


def test_identical_captions_give_chance_retrieval_not_a_tie_advantage():
    rng = np.random.default_rng(4)
    img = rng.normal(size=(8, 5))
    same = np.tile(rng.normal(size=(1, 5)), (8, 1))  # every caption identical
    out = retrieval_metrics(img, same, ks=(1, 3))
    assert out["text_retrieval_recall_tie_aware@1"] == pytest.approx(1 / 8)  # image -> text: chance
    assert out["text_retrieval_recall_tie_aware@3"] == pytest.approx(3 / 8)
    # CLIP_benchmark's figure is a 0/1 hit per image: whichever of the tied captions torch.topk returns first
    assert out["text_retrieval_recall@1"] * 8 == round(out["text_retrieval_recall@1"] * 8)
    # two own captions tied with two others at the top, k = 1 and 2: 1 - C(2, m) / C(4, m)
    from alignclip.eval.retrieval import tie_aware_hit_rate
    np.testing.assert_allclose(tie_aware_hit_rate(np.array([0, 0, 1]), np.array([2, 2, 2]), np.array([2, 2, 2]), 2),
                               [1 - 1 / 6, 1 - 1 / 6, 0.5])
    np.testing.assert_allclose(tie_aware_hit_rate(np.array([0]), np.array([2]), np.array([2]), 1), [0.5])


def test_clip_benchmark_build_reads_our_json(tmp_path):
    import csv
    import subprocess
    import sys

    from alignclip.eval.results import read_results, write_tables

    write_result(tmp_path / "r", "cifar10", "tiny", "zeroshot_classification", {"acc1": 0.5, "acc5": 0.9})
    write_result(tmp_path / "r", "flickr30k", "tiny", "zeroshot_retrieval", {"image_retrieval_recall@5": 0.25})
    proc = subprocess.run([sys.executable, "-m", "clip_benchmark.cli", "build", str(tmp_path / "r"), "--output",
                           str(tmp_path / "bench.csv")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader((tmp_path / "bench.csv").open()))
    assert sorted(r["dataset"] for r in rows) == ["cifar10", "flickr30k"]
    assert {r["model_fullname"] for r in rows} == {"tiny "}
    csv_path, md_path = write_tables(read_results([tmp_path / "r"]), tmp_path)
    assert "| cifar10 | tiny |  | zeroshot_classification | 0.5000 | 0.9000 |" in md_path.read_text()


# ------------------------------------------------------------------------ standard datasets, built tiny on disk
CLASSES = ["red", "green", "blue", "yellow", "cyan", "magenta"]
COLOURS = [(220, 30, 30), (30, 200, 40), (30, 40, 220), (230, 220, 30), (30, 210, 220), (210, 30, 200)]


def _picture(label: int, i: int, size: int = 64):
    """A noisy image of the class colour, size x size (so every preprocessing leaves it as is)."""
    from PIL import Image

    rng = np.random.default_rng(100 * label + i)
    pixels = np.clip(np.array(COLOURS[label]) + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def _png_bytes(img) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _captions(label: int, i: int) -> list[str]:
    return [f"a {CLASSES[label]} square number {i}", f"something {CLASSES[label]} ({i})"]  # no two alike


WDS_SAMPLES = [(label, i) for label in range(len(CLASSES)) for i in range(4)]
WDS_TEMPLATES = ["a photo of a {c} thing.", "it is {c}."]


def _write_wds(root, kind: str, shards: int = 2, labels=None, unreadable: tuple[int, ...] = (),
               left_out: tuple[int, ...] = ()):
    """CLIP_benchmark's webdataset layout (ROOT/test/nshards.txt, 0.tar, ...; dataset_type, classnames, templates):
    the pictures of WDS_SAMPLES, with their colour as class unless ``labels`` gives each sample's class; the
    samples numbered in ``unreadable`` have a truncated PNG, those in ``left_out`` are not written."""
    import webdataset as wds

    (root / "test").mkdir(parents=True)
    order = list(range(len(WDS_SAMPLES)))
    for shard in range(shards):
        with wds.TarWriter(str(root / "test" / f"{shard}.tar")) as sink:
            for n in (n for n in order[shard::shards] if n not in left_out):
                label, i = WDS_SAMPLES[n]
                png = _png_bytes(_picture(label, i))
                sample = {"__key__": f"s{shard}_{n:04d}", "png": png[:len(png) // 2] if n in unreadable else png}
                if kind == "retrieval":
                    sample["txt"] = "\n".join(_captions(label, i))
                else:
                    sample["cls"] = str(label if labels is None else labels[n])
                sink.write(sample)
    (root / "test" / "nshards.txt").write_text(str(shards))
    (root / "dataset_type.txt").write_text(kind)
    if kind == "classification":
        (root / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
        (root / "zeroshot_classification_templates.txt").write_text("\n".join(WDS_TEMPLATES) + "\n")


def _write_cifar(root, kind: str, per_class: int = 2):
    """torchvision's on-disk CIFAR format: pickled dict batches of uint8 [n, 3072] rows (channel-major) + labels."""
    import pickle

    folder = root / ("cifar-10-batches-py" if kind == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True)
    classes = 10 if kind == "cifar10" else 100
    label_key = "labels" if kind == "cifar10" else "fine_labels"
    names = [f"class_{c}" for c in range(classes)]
    rng = np.random.default_rng(0)

    def batch(n_per_class):
        labels = [c for c in range(classes) for _ in range(n_per_class)]
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        return {"batch_label": "tiny", label_key: labels, "data": data,
                "filenames": [f"{i}.png" for i in range(len(labels))]}

    files = ([f"data_batch_{i}" for i in range(1, 6)], "test_batch") if kind == "cifar10" else (["train"], "test")
    for name in files[0]:
        (folder / name).write_bytes(pickle.dumps(batch(1)))
    (folder / files[1]).write_bytes(pickle.dumps(batch(per_class)))
    meta = {"label_names": names} if kind == "cifar10" else {"fine_label_names": names, "coarse_label_names": []}
    (folder / ("batches.meta" if kind == "cifar10" else "meta")).write_bytes(pickle.dumps(meta))
    return names


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_cifar_on_disk_format_is_read_with_torchvision(kind, tmp_path):
    from alignclip.eval.datasets import open_benchmark, shipped

    names = _write_cifar(tmp_path, kind)
    data = open_benchmark(kind, tmp_path, split="test")
    classes = 10 if kind == "cifar10" else 100
    assert len(data.dataset) == 2 * classes and data.classnames == [n.replace("_", " ") for n in names]
    image, label = data.dataset[3]
    assert image.size == (32, 32) and label == 1
    assert data.templates == shipped("templates")[kind] and len(data.templates) == 18
    assert len(open_benchmark(kind, tmp_path, split="train").dataset) == (5 if kind == "cifar10" else 1) * classes
    with pytest.raises(FileNotFoundError, match="pickled batches"):
        open_benchmark(kind, tmp_path / "missing")


def test_imagefolder_karpathy_and_wds_layouts(tmp_path):
    from alignclip.eval.datasets import ClassificationData, RetrievalData, open_benchmark, shipped
    from alignclip.data.transforms import ImageTransform

    for label, name in enumerate(["golden_retriever", "tabby_cat"]):
        (tmp_path / "folder" / name).mkdir(parents=True)
        for i in range(2):
            _picture(label, i).save(tmp_path / "folder" / name / f"{i}.png")
    # a palette PNG with transparency decodes to RGB too
    _picture(0, 9).convert("P").save(tmp_path / "folder" / "tabby_cat" / "p.png", transparency=0)
    folder = open_benchmark("imagefolder", tmp_path / "folder", transform=ImageTransform(64))
    assert isinstance(folder, ClassificationData) and folder.classnames == ["golden retriever", "tabby cat"]
    assert len(folder.dataset) == 5 and folder.dataset[4][0].shape == (3, 64, 64) and folder.dataset[4][1] == 1
    assert folder.templates == shipped("templates")["imagenet1k"] and len(folder.templates) == 80
    assert len(shipped("classnames")["imagenet1k"]) == 1000

    images = []
    for i in range(4):
        sub = "val2014" if i % 2 else ""
        (tmp_path / "coco" / sub).mkdir(parents=True, exist_ok=True)
        _picture(i, 0).save(tmp_path / "coco" / sub / f"{i}.jpg")
        images.append({"filename": f"{i}.jpg", "filepath": sub, "split": "test" if i < 3 else "train",
                       "sentences": [{"raw": c} for c in _captions(i, 0)]})
    (tmp_path / "karpathy.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    karpathy = open_benchmark("karpathy", tmp_path / "coco", annotations=tmp_path / "karpathy.json")
    assert isinstance(karpathy, RetrievalData) and len(karpathy.dataset) == 3
    assert karpathy.dataset[1][1] == _captions(1, 0)

    _write_wds(tmp_path / "wds_cls", "classification")
    _write_wds(tmp_path / "wds_ret", "retrieval")
    cls = open_benchmark("wds", tmp_path / "wds_cls")
    assert cls.classnames == CLASSES and cls.templates == WDS_TEMPLATES
    assert sorted(label for _, label in cls.dataset) == sorted(list(range(6)) * 4)
    ret = open_benchmark("wds", tmp_path / "wds_ret")
    assert sum(len(caps) for _, caps in ret.dataset) == 48
    with pytest.raises(FileNotFoundError, match="nshards.txt"):
        open_benchmark("wds", tmp_path / "folder")


def test_our_metrics_equal_clip_benchmarks_own_evaluation(tmp_path):
    """A tiny model exported to OpenCLIP; CLIP_benchmark's own dataset reader and evaluate functions on it, and
    ours on our export of the same model, on the same webdataset classification and retrieval sets (CB runs
    unpatched: constraints.txt keeps numpy below 2.4)."""
    import open_clip
    import torch
    from clip_benchmark.datasets.builder import build_dataset, image_captions_collate_fn
    from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval

    from alignclip.config import load_config
    from alignclip.embeddings import encode_texts
    from alignclip.eval.benchmark import evaluate_benchmark
    from alignclip.prompts import build_classifier
    from alignclip.eval.datasets import open_benchmark
    from alignclip.data.transforms import ImageTransform
    from alignclip.export import load_model, save_exported, save_openclip
    from alignclip.models import build_model
    from alignclip.tokenizer import get_tokenizer

    config = load_config("model/clip_tiny")
    torch.manual_seed(0)
    model = build_model(config.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_exported(model, config, tmp_path / "ours.safetensors")
    save_openclip(model, config, tmp_path / "oc")
    # labels: the (random) model's own top-1 class for every other sample, another class for the rest, so that
    # top-1 accuracy and per-class recall are far from 0 and 1 and a wrong count would show
    with torch.no_grad():
        pixels = ImageTransform(64)([_picture(label, i) for label, i in WDS_SAMPLES])
        weights = build_classifier(lambda t: encode_texts(model, get_tokenizer(32), t), CLASSES, WDS_TEMPLATES)
        predicted = (model.encode_image(pixels, normalize=True).numpy() @ weights.T).argmax(1)
    labels = [int(p) if n % 2 else int(p + 1) % len(CLASSES) for n, p in enumerate(predicted)]
    _write_wds(tmp_path / "wds_cls", "classification", labels=labels)
    _write_wds(tmp_path / "wds_ret", "retrieval")

    theirs, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'oc'}")
    theirs.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'oc'}")
    cls = build_dataset("wds/tiny", root=str(tmp_path / "wds_cls"), transform=preprocess, split="test")
    their_cls = zeroshot_classification.evaluate(
        theirs, torch.utils.data.DataLoader(cls, batch_size=5), tokenizer, cls.classes, cls.templates, "cpu",
        amp=False)
    ret = build_dataset("wds/tiny", root=str(tmp_path / "wds_ret"), transform=preprocess, split="test",
                        task="zeroshot_retrieval")
    their_ret = zeroshot_retrieval.evaluate(
        theirs, torch.utils.data.DataLoader(ret, batch_size=5, collate_fn=image_captions_collate_fn), tokenizer,
        "cpu", amp=False, recall_k_list=[1, 5, 10])

    ours, _ = load_model(tmp_path / "ours.safetensors")
    our_tok, transform = get_tokenizer(config.model.text.context_length), ImageTransform(64)
    our_cls = evaluate_benchmark(ours, our_tok, open_benchmark("wds", tmp_path / "wds_cls", transform=transform),
                                 batch_size=7, workers=2)["zeroshot_classification"]
    our_ret = evaluate_benchmark(ours, our_tok, open_benchmark("wds", tmp_path / "wds_ret", transform=transform),
                                 batch_size=7, workers=0)["zeroshot_retrieval"]
    rows = [(f"classification {k}", our_cls[k], their_cls[k]) for k in ("acc1", "acc5", "mean_per_class_recall")]
    rows += [(f"retrieval {k}", our_ret[k], their_ret[k]) for k in sorted(their_ret)]
    print("\n| metric | ours | CLIP_benchmark | difference |\n|---|---|---|---|")
    for name, a, b in rows:
        print(f"| {name} | {a:.4f} | {b:.4f} | {abs(a - b):.1e} |")
    for name, a, b in rows:
        assert abs(a - b) <= 1e-4, (name, a, b)
    assert 0 < our_ret["image_retrieval_recall@5"] < 1  # neither trivial nor perfect: the comparison can fail
    assert 0.3 < our_cls["acc1"] < 0.7 and 0 < our_cls["mean_per_class_recall"] < 1


def test_unreadable_images_are_skipped_counted_and_named(tmp_path, caplog):
    """One folder, Karpathy split and webdataset each with and without two images that do not decode: the
    figures with them equal the figures without them, plus images_skipped (batch size 1: each image is encoded
    alone, so the embeddings are the same to the bit)."""
    import torch

    from alignclip.config import load_config
    from alignclip.eval.benchmark import evaluate_benchmark
    from alignclip.eval.datasets import open_benchmark
    from alignclip.data.transforms import ImageTransform
    from alignclip.models import build_model
    from alignclip.tokenizer import get_tokenizer

    config = load_config("model/clip_tiny")
    torch.manual_seed(0)
    model = build_model(config.model).eval()
    tokenizer, transform = get_tokenizer(config.model.text.context_length), ImageTransform(64)

    def evaluate(kind, root, **kw):
        train = open_benchmark(kind, root, "train", transform) if kind == "imagefolder" else None
        return evaluate_benchmark(model, tokenizer, open_benchmark(kind, root, transform=transform, **kw),
                                  batch_size=1, workers=2, train=train)

    images = []
    for name, bad in (("clean", False), ("damaged", True)):
        for label in range(len(CLASSES)):
            (tmp_path / name / CLASSES[label]).mkdir(parents=True)
            for i in range(2):
                _picture(label, i).save(tmp_path / name / CLASSES[label] / f"{i}.png")
        if bad:
            truncated = _png_bytes(_picture(1, 9))
            (tmp_path / name / CLASSES[1] / "9_truncated.png").write_bytes(truncated[:len(truncated) // 2])
            (tmp_path / name / CLASSES[2] / "9_not_an_image.jpg").write_bytes(b"<html>404</html>")
        images = [{"filename": str(f.relative_to(tmp_path / name)), "split": "test",
                   "sentences": [{"raw": c} for c in _captions(CLASSES.index(f.parent.name), int(f.stem[0]))]}
                  for f in sorted((tmp_path / name).rglob("*.*"))]
        (tmp_path / f"{name}.json").write_text(json.dumps({"images": images}))
        _write_wds(tmp_path / f"wds_{name}", "classification", **{"unreadable" if bad else "left_out": (3, 10)})
    assert len(images) == 14

    clean, damaged = evaluate("imagefolder", tmp_path / "clean"), evaluate("imagefolder", tmp_path / "damaged")
    print("\nclean:", clean, "\ndamaged:", damaged)
    measured = {"images_measured": 12, "images_skipped": 0}
    assert clean["zeroshot_classification"].items() >= measured.items()
    assert damaged["zeroshot_classification"] == {**clean["zeroshot_classification"], "images_skipped": 2}
    assert damaged["linear_probe"] == {**clean["linear_probe"], "images_skipped": 2, "train_images_skipped": 2,
                                       "train_images_measured": 12}
    assert "9_truncated.png" in caplog.text and "9_not_an_image.jpg" in caplog.text

    clean, damaged = (evaluate("karpathy", tmp_path / name, annotations=tmp_path / f"{name}.json")
                      for name in ("clean", "damaged"))
    assert clean["zeroshot_retrieval"].items() >= {**measured, "captions_measured": 24}.items()
    assert damaged["zeroshot_retrieval"] == {**clean["zeroshot_retrieval"], "images_skipped": 2}

    clean, damaged = (evaluate("wds", tmp_path / f"wds_{name}") for name in ("clean", "damaged"))
    assert damaged["zeroshot_classification"] == {**clean["zeroshot_classification"], "images_skipped": 2}
    assert "s1_0003.png" in caplog.text and "s0_0010.png" in caplog.text


def test_an_imagefolder_probe_fits_on_its_own_train_folder(tmp_path, capsys):
    """An image folder is one split, so --linear-probe needs --probe-root: a probe fitted on the images it is
    scored on measures nothing. The train folder's classes hold the next class's colour, so a probe fitted there
    (and not on the evaluated folder) scores far below one."""
    from alignclip.commands.evaluate import main
    from tests.helpers.tiny import export_untrained, tiny_overrides

    model = export_untrained(tmp_path / "m.safetensors", tiny_overrides("unused"))
    for split, names, colour in (("val", CLASSES[:3], lambda k: k), ("train", CLASSES[:3], lambda k: (k + 1) % 3),
                                 ("other", CLASSES[3:], lambda k: k)):
        for k, name in enumerate(names):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(3):
                _picture(colour(k), i + 10 * (split == "train")).save(tmp_path / split / name / f"{i}.png")
    base = ["--model", str(model), "--benchmark", "imagefolder", "--root", str(tmp_path / "val"), "--workers", "0",
            "--out", str(tmp_path / "out")]
    for extra, message in ((["--linear-probe"], "needs --probe-root"),
                           (["--linear-probe", "--probe-root", str(tmp_path / "val")], "other than --root"),
                           (["--probe-root", str(tmp_path / "train")], "give --linear-probe too")):
        with pytest.raises(SystemExit) as stop:
            main(base + extra)
        assert stop.value.code == 2 and message in capsys.readouterr().err, extra
    assert main(base + ["--linear-probe", "--probe-root", str(tmp_path / "other")]) == 2
    assert "has 3 classes (cyan, magenta, yellow), the evaluated split 3 (blue, green, red)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main(["--model", str(model), "--benchmark", "karpathy", "--root", str(tmp_path), "--annotations", "x.json",
              "--linear-probe", "--out", str(tmp_path / "out")])
    assert stop.value.code == 2 and "needs a classification dataset" in capsys.readouterr().err

    assert main(base + ["--linear-probe", "--probe-root", str(tmp_path / "train")]) == 0
    probe = json.loads((tmp_path / "out" / "imagefolder_m_linear_probe.json").read_text())["metrics"]
    print("\nprobe fitted on the shifted train folder, scored on val:", probe)
    assert probe["acc1"] < 0.5  # fitted on val itself, it would be near 1


def _train_with_tensorboard(rank, world_size, root: str):
    from alignclip.config import load_config
    from alignclip.training.trainer import train

    config = load_config("model/alignclip_tiny", [
        "name=tb", f"output_dir={root}/runs", "data.train=generated", f"data.cache_dir={root}/data",
        "data.generated.num_shards=2", "data.generated.samples_per_shard=32", "data.generated.val_samples=32",
        "data.workers=0", "train.global_batch_size=8", "train.max_steps=4", "optim.warmup_steps=1",
        "logging.progress_bar=false", "logging.gap_every_steps=2", "logging.gap_batch_size=16",
        "eval.every_steps=2", "eval.dataset=wds", f"eval.root={root}/wds_cls", "eval.batch_size=8"])
    result = train(config)
    return result.exit_code, str(result.run_dir), result.eval


@pytest.mark.heavy
def test_tensorboard_has_config_gap_plots_eval_and_hparams(tmp_path):
    """A short real training run; its event files read back with TensorBoard's EventAccumulator."""
    from pathlib import Path

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    from tests.helpers.ranks import run_on_ranks

    _write_wds(tmp_path / "wds_cls", "classification", unreadable=(5,))  # the periodic eval skips and counts it
    ((code, run_dir, final_eval),) = run_on_ranks(_train_with_tensorboard, 1, str(tmp_path))
    assert code == 0
    run_dir = Path(run_dir)
    main_run = EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    main_run.Reload()
    tags = main_run.Tags()
    print("\nscalars:", sorted(tags["scalars"]), "\nimages:", sorted(tags["images"]),
          "\ntext:", sorted(t for t in tags["tensors"] if "config" in t))
    assert {"gap/cosine_cdf", "gap/pca_projection"} <= set(tags["images"])
    assert [e.step for e in main_run.Images("gap/pca_projection")] == [2, 4]
    assert main_run.Images("gap/cosine_cdf")[0].width > 100
    for task, metric in (("zeroshot_classification", "acc1"), ("zeroshot_classification", "mean_per_class_recall")):
        events = main_run.Scalars(f"eval/{task}/{metric}")
        assert [e.step for e in events] == [2, 4] and all(0 <= e.value <= 1 for e in events)
    assert [e.value for e in main_run.Scalars("eval/zeroshot_classification/images_skipped")] == [1, 1]
    last = main_run.Scalars("eval/zeroshot_classification/acc1")[-1].value  # float32 in the event file
    assert final_eval["eval/zeroshot_classification/acc1"] == pytest.approx(last, abs=1e-6)
    config_text = [t for t in tags["tensors"] if t.startswith("config")]
    assert config_text
    text = main_run.Tensors(config_text[0])[0].tensor_proto.string_val[0].decode()
    assert "arch: sharedclip" in text and "every_steps: 2" in text

    hp_run = EventAccumulator(str(run_dir / "tb" / "hparams"))
    hp_run.Reload()
    content = hp_run.PluginTagToContent("hparams")
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    hparams = {k: getattr(v, v.WhichOneof("kind")) for k, v in session.hparams.items()}
    print("hparams:", {k: hparams[k] for k in sorted(hparams)[:12]}, "... of", len(hparams))
    assert hparams["model.arch"] == "sharedclip" and hparams["train.max_steps"] == 4
    assert hparams["loss.imsep_weight"] > 0
    final = {t for t in hp_run.Tags()["scalars"]}
    print("hparams metrics:", sorted(final))
    assert {"final/gap/alignment_score", "final/eval/zeroshot_classification/acc1"} <= final
    metrics = json.loads((run_dir / "final_metrics.json").read_text())
    assert metrics["eval/zeroshot_classification/acc1"] == final_eval["eval/zeroshot_classification/acc1"]


def test_imagenet_val_layout_gets_the_imagenet_class_names(tmp_path):
    from PIL import Image

    from alignclip.eval.datasets import open_benchmark, shipped

    pixel = Image.new("RGB", (1, 1))
    wnids = [f"n{1440764 + 7 * i:08d}" for i in range(1000)]  # sorted wnid-named folders, as ImageNet's val
    for wnid in wnids:
        (tmp_path / wnid).mkdir()
        pixel.save(tmp_path / wnid / "a.png")
    data = open_benchmark("imagefolder", tmp_path)
    assert data.classnames == shipped("classnames")["imagenet1k"] and data.classnames[:2] == ["tench", "goldfish"]
    assert data.dataset[0][1] == 0 and data.dataset[999][1] == 999
