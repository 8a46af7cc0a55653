"""make_shards (alignclip.commands.make_shards) and tools/embed_captions.py, run as a user would (their main(), in
process)."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers.tools import command


@pytest.fixture
def photo_folder(tmp_path) -> tuple[Path, Path]:
    """10 images (JPEG, PNG and one BMP that gets re-encoded) and a CSV naming them, plus one missing file."""
    images = tmp_path / "photos"
    images.mkdir()
    rows = []
    for i in range(10):
        ext = ("jpg", "png", "bmp")[i % 3]
        colour = np.full((20, 30, 3), i * 20, np.uint8)
        Image.fromarray(colour).save(images / f"img{i}.{ext}")
        rows.append((f"img{i}.{ext}", f"picture number {i}, grey"))
    rows.append(("missing.jpg", "this one does not exist"))
    captions = tmp_path / "captions.csv"
    captions.write_text("filepath,caption\n" + "".join(f'{a},"{b}"\n' for a, b in rows))
    return images, captions


def test_make_shards_from_a_folder_then_validate_and_resume(photo_folder, tmp_path, capsys):
    make_shards = command("make_shards")
    images, captions = photo_folder
    out = tmp_path / "shards"
    args = ["folder", "--images", str(images), "--captions", str(captions), "--out", str(out),
            "--samples-per-shard", "4"]
    assert make_shards(args) == 0
    assert "wrote 3 shard(s) with 10 samples (1 unreadable images and 0 over 100,000,000 pixels left out)" \
        in capsys.readouterr().out
    with tarfile.open(out / "00000.tar") as tar:
        names = tar.getnames()
    assert names[:3] == ["000000000.jpg", "000000000.txt", "000000000.json"] and "000000002.jpg" in names  # bmp
    assert json.loads((out / "00002_stats.json").read_text())["successes"] == 2  # img8, img9; missing.jpg failed

    assert make_shards(["validate", str(out)]) == 0
    assert '"usable": 10' in capsys.readouterr().out

    assert make_shards(args) == 0  # same arguments: resume, keep everything
    assert "kept 3 finished shard(s)" in capsys.readouterr().out
    assert make_shards(args[:-1] + ["5"]) == 2  # other arguments: refused
    assert "--overwrite" in capsys.readouterr().err
    assert make_shards(args[:-1] + ["5", "--overwrite"]) == 0
    assert "wrote 3 shard(s)" in capsys.readouterr().out


def test_validate_reports_corrupt_images_and_damaged_shards(tmp_path, capsys):
    make_shards = command("make_shards")
    out = tmp_path / "gen"
    assert make_shards(["generated", "--out", str(out), "--num-shards", "2", "--samples-per-shard", "8",
                             "--image-size", "32"]) == 0
    assert make_shards(["validate", str(out)]) == 0
    data = (out / "train-00001.tar").read_bytes()
    (out / "train-00001.tar").write_bytes(data[: len(data) // 2])
    report = tmp_path / "report.json"
    assert make_shards(["validate", str(out), "--json", str(report)]) == 1
    printed = capsys.readouterr().out
    assert "PROBLEM" in printed and "truncated_shard" in printed
    totals = json.loads(report.read_text())["totals"]
    assert totals["damaged_shards"] == 1 and totals["stats_mismatch"] == 1 and totals["samples"] < 16


def test_embed_captions_tool_writes_sidecars_for_its_array_part(tmp_path, capsys):
    make_shards, embed = command("make_shards"), command("embed_captions")
    shards = tmp_path / "gen"
    assert make_shards(["generated", "--out", str(shards), "--num-shards", "3", "--samples-per-shard", "4",
                             "--image-size", "32"]) == 0
    sem = tmp_path / "sem"
    assert embed([str(shards), "--out", str(sem), "--model", "minilm-offline", "--device", "cpu",
                       "--shard-index", "1", "--num-parts", "2"]) == 0
    assert sorted(p.name for p in sem.iterdir()) == ["train-00001.sem.npz"]
    with np.load(sem / "train-00001.sem.npz") as npz:
        assert npz["embeddings"].dtype == np.float16 and npz["embeddings"].shape == (4, 384)
        assert list(npz["keys"]) == [f"{4 + i:09d}" for i in range(4)]


@pytest.mark.parametrize("suffix", ["csv", "tsv", "jsonl"])
def test_captions_files_are_read_by_column_name(tmp_path, suffix):
    from alignclip.data.writer import read_captions_file

    rows = [("a.jpg", "a dog, running"), ("b.png", "two cats")]
    path = tmp_path / f"captions.{suffix}"
    if suffix == "jsonl":
        path.write_text("".join(json.dumps({"text": c, "image": i}) + "\n" for i, c in rows))
    elif suffix == "tsv":
        path.write_text("Caption\tfilepath\n" + "".join(f"{c}\t{i}\n" for i, c in rows))
    else:
        path.write_text("path,title\n" + "".join(f'{i},"{c}"\n' for i, c in rows))
    assert read_captions_file(path) == rows
    bad = tmp_path / "bad.csv"
    bad.write_text("url,caption\nhttp://x,y\n")
    with pytest.raises(ValueError, match="no image column"):
        read_captions_file(bad)


def test_bench_data_stages_and_plan_arithmetic_on_tiny_shards(tmp_path):
    """tools/bench_data.py's pieces at a tiny size: each pipeline's stages are measured with its own code, the
    earlier commit is extracted read-only, and the plan's workers per GPU follow from the FLOP model's H100 rate."""
    import bench_data  # tools/ is on the tests' path (pyproject: pythonpath)

    from alignclip.config import load_config
    from alignclip.training.flops import step_flops

    bench_data.write_bench_shards(tmp_path, 1, 6, 48, 40)
    spec = str(tmp_path / "00000.tar")
    for case in ("ours", "ours gpu"):
        stages = bench_data.stage_breakdown(case, spec, 6, 32, 4)
        assert list(stages) == list(bench_data.STAGES) and all(v >= 0 for v in stages.values())
    assert bench_data.stage_breakdown("ours gpu", spec, 6, 32, 4)["crop + resize"] == 0.0  # on the device
    rate = bench_data.h100_samples_per_s()
    assert rate == pytest.approx(0.4 * 989.4e12 / step_flops(load_config("experiment/cc12m_alignclip")).total)
    assert bench_data.workers_per_gpu({"read": 0.5, "decode": 0.5}, 2500.0) == (1000.0, 3)
    runs = [dict.fromkeys(bench_data.STAGES, v) for v in (3.0, 1.0, 2.0)]
    assert bench_data.median_stages(runs) == dict.fromkeys(bench_data.STAGES, 2.0)
    assert bench_data.median_stages(runs + [{"error": "boom"}]) == {"error": "boom"}
    before = bench_data.extract_commit("HEAD", tmp_path / "before")
    assert (Path(before) / "alignclip" / "data" / "pipeline.py").is_file()


def test_validate_counts_what_training_uses_a_latin1_caption_and_an_empty_tar(tmp_path, capsys):
    from alignclip.config import load_config
    from alignclip.data import build_train_loader
    from alignclip.data.writer import ShardWriter
    from tests.helpers.tiny import draw_shape

    make_shards = command("make_shards")
    out = tmp_path / "shards"
    rng = np.random.default_rng(0)
    with ShardWriter(out / "00000.tar") as writer:
        for i in range(16):  # the last one is latin-1 ("café" as one 0xE9 byte): training drops it
            caption = "un caf\xe9 rouge".encode("latin-1") if i == 15 else f"a red square {i}".encode()
            writer.write(f"{i:09d}", {"jpg": draw_shape("red", "square", rng), "txt": caption})
    for stats in out.glob("*_stats.json"):
        stats.unlink()
    report = tmp_path / "report.json"
    assert make_shards(["validate", str(out), "--json", str(report)]) == 1  # was 0: "16 usable"
    assert "1 caption(s) not UTF-8" in capsys.readouterr().out
    totals = json.loads(report.read_text())["totals"]
    assert totals["usable"] == 15 and totals["undecodable_caption"] == 1

    config = load_config(None, [f"data.train={out}", "data.workers=0", "data.samples_per_epoch=15",
                                "train.global_batch_size=15", "model.vision.image_size=32",
                                "model.vision.patch_size=16", "data.shuffle_buffer=1"])
    loader = build_train_loader(config, 0, 1, epoch=0)
    (batch,) = list(loader)
    assert len(batch["key"]) == totals["usable"] and loader.stats()["undecodable_caption"] == 1

    with tarfile.open(out / "00001.tar", "w"):
        pass  # a valid tar with no member
    assert make_shards(["validate", str(out / "00001.tar"), "--json", str(report)]) == 1  # was 0, silently
    assert "empty_shard" in capsys.readouterr().out
    assert json.loads(report.read_text())["shards"][0]["damaged"] == "empty_shard"
