"""Data faults are counted skips, never deaths: shards that vanish mid-run (folder and brace specs), a tar cut at a
member boundary, a wrong-width or non-finite embedding, caption bytes that are not UTF-8; and .tar.gz shards."""

from __future__ import annotations

import gzip
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from alignclip.config import load_config
from alignclip.data import build_train_loader
from alignclip.data.shards import ShardErrors, expand_spec, iter_raw_samples
from alignclip.data.writer import ShardWriter
from tests.helpers.tiny import write_toy_shards


def _config(train: str, **extra):
    values = {"data.train": train, "model.vision.image_size": 32, "model.vision.patch_size": 16,
              "train.global_batch_size": 16, "data.workers": 0, "data.shuffle_buffer": 16, "train.seed": 2}
    values.update(extra)
    return load_config(None, [f"{k}={v}" for k, v in values.items()])


def test_tar_gz_shards_read_like_the_plain_ones(tmp_path):
    plain = Path(write_toy_shards(tmp_path / "plain", num_shards=2, per_shard=16))
    packed = tmp_path / "packed"
    packed.mkdir()
    for shard in sorted(plain.glob("*.tar")):
        (packed / (shard.name + ".gz")).write_bytes(gzip.compress(shard.read_bytes()))
    assert [Path(p).name for p in expand_spec(str(packed))] == ["00000.tar.gz", "00001.tar.gz"]
    a = list(build_train_loader(_config(str(plain)), 0, 1, 0))
    b = list(build_train_loader(_config(str(packed)), 0, 1, 0))
    assert len(a) == len(b) == 2
    assert all(x["key"] == y["key"] and torch.equal(x["image"], y["image"]) for x, y in zip(a, b))


@pytest.mark.parametrize("into_header", [0, 100])
def test_a_tar_cut_at_or_inside_a_member_header_counts_as_truncated(tmp_path, into_header):
    shard = Path(write_toy_shards(tmp_path, num_shards=1, per_shard=8)) / "00000.tar"
    with tarfile.open(shard) as tar:
        headers = [m.offset for m in tar.getmembers()]
    cut = headers[10] + into_header  # sample 3's .txt header (jpg, txt, json per sample): 0-2 are complete
    shard.write_bytes(shard.read_bytes()[:cut])
    errors = ShardErrors()
    samples = list(iter_raw_samples(str(shard), errors))
    assert errors.counts["truncated_shard"] == 1 and errors.counts["unreadable_shard"] == 0
    assert [sorted(s) for s in samples[:3]] == [["__key__", "__shard__", "jpg", "json", "txt"]] * 3
    assert len(samples) == 4 and "txt" not in samples[3]  # the cut sample keeps what was read, then is dropped
    intact = Path(write_toy_shards(tmp_path / "ok", num_shards=1, per_shard=8)) / "00000.tar"
    errors = ShardErrors()
    assert len(list(iter_raw_samples(str(intact), errors))) == 8 and errors.counts["truncated_shard"] == 0


@pytest.mark.parametrize("kind", ["folder", "brace"])
def test_shards_that_vanish_mid_run_are_skipped_and_the_epochs_keep_their_length(tmp_path, kind, caplog):
    folder = Path(write_toy_shards(tmp_path / kind, num_shards=4, per_shard=16))
    spec = str(folder) if kind == "folder" else str(folder / "{00000..00003}.tar")
    config = _config(spec, **{"data.workers": 2})
    loader = build_train_loader(config, 0, 1, epoch=0)
    assert len(loader) == 4
    for name in ("00001.tar", "00002.tar", "00003.tar"):  # deleted after the epoch was planned
        (folder / name).unlink()
    batches = list(loader)
    assert len(batches) == 4 and all(len(b["key"]) == 16 for b in batches)
    assert loader.stats()["unreadable_shard"] >= 1
    # the next epoch: the listing lost three shards; the length stays (counted once), the readers wrap
    later = build_train_loader(config, 0, 1, epoch=1)
    batches = list(later)
    assert len(batches) == len(later) == 4
    assert "reading from all" in caplog.text or later.stats()["wrapped_passes"] > 0


def _shard_with(path: Path, samples: dict[str, dict]) -> None:
    good = write_toy_shards(path.parent / "src", num_shards=1, per_shard=1)
    with tarfile.open(Path(good) / "00000.tar") as tar:
        jpeg = tar.extractfile([n for n in tar.getnames() if n.endswith(".jpg")][0]).read()
    with ShardWriter(path) as writer:
        for key, fields in samples.items():
            writer.write(key, {"jpg": jpeg, **fields})


def test_bad_embeddings_and_undecodable_captions_are_counted_skips_naming_shard_and_key(tmp_path, caplog):
    vec = lambda *v: np.asarray(v, np.float16)  # noqa: E731
    samples = {f"{i:04d}": {"txt": f"a photo {i}", "sem.npy": vec(*np.linspace(-1, 1, 4))} for i in range(20)}
    samples["0003"]["sem.npy"] = vec(1, 2, 3)  # wrong width
    samples["0007"]["sem.npy"] = vec(1, np.nan, 0, 0)  # non-finite
    samples["0011"]["txt"] = b"caf\xe9 au lait"  # latin-1, not UTF-8
    shard = tmp_path / "shards" / "00000.tar"
    _shard_with(shard, samples)
    loader = build_train_loader(_config(str(shard), **{"data.samples_per_epoch": 16}), 0, 1, 0)
    assert loader.has_semantic
    batches = list(loader)
    keys = {k for b in batches for k in b["key"]}
    assert len(batches) == 1 and not keys & {"0003", "0007", "0011"}
    stats = loader.stats()
    assert stats["bad_semantic"] == 2 and stats["undecodable_caption"] == 1
    assert f"{shard}:0003: sem.npy has shape (3,), expected (4,)" in caplog.text
    assert f"{shard}:0007: sem.npy has non-finite values" in caplog.text
    assert f"{shard}:0011: txt is not UTF-8" in caplog.text
    assert all(torch.isfinite(b["semantic"]).all() for b in batches)
