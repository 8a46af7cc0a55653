"""Weighted sources: ``data.train='a/::b/'`` with ``data.weights='3::1'`` resamples shards with OpenCLIP's upsampling
factors, deterministically under the seed, resumable by ``start_batch``, with per-source counters in the stats."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from alignclip.config import ConfigError, load_config
from alignclip.data import build_train_loader
from alignclip.data.writer import ShardWriter
from tests.helpers.tiny import draw_shape  # a small coloured-shape JPEG

import numpy as np


def _source(folder: Path, prefix: str, shards: int = 4, per_shard: int = 4) -> str:
    rng = np.random.default_rng(len(prefix))
    for s in range(shards):
        with ShardWriter(folder / f"{s:05d}.tar") as writer:
            for i in range(per_shard):
                writer.write(f"{prefix}{s:02d}{i:02d}", {"jpg": draw_shape("red", "disc", rng), "txt": f"{prefix} {i}"})
    return str(folder)


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("mix")
    return _source(root / "a", "a") + "::" + _source(root / "b", "b")


def _config(spec: str, **extra):
    values = {"data.train": spec, "data.weights": "3::1", "data.resampled": True, "data.samples_per_epoch": 512,
              "model.vision.image_size": 32, "model.vision.patch_size": 16, "train.global_batch_size": 16,
              "data.workers": 2, "data.shuffle_buffer": 8, "train.seed": 5}
    values.update(extra)
    return load_config(None, [f"{k}={v}" for k, v in values.items()])


def test_upsampling_factors_set_each_sources_share_and_the_counters_match_the_batches(two_sources):
    loader = build_train_loader(_config(two_sources), 0, 1, epoch=0)
    keys = [k for b in loader for k in b["key"]]
    assert len(keys) == 512
    from_a = sum(k.startswith("a") for k in keys)
    stats = loader.stats()
    assert (stats["source0_samples"], stats["source1_samples"]) == (from_a, 512 - from_a)
    assert 0.62 < from_a / 512 < 0.88  # 3:1 with equal shard counts: 75 % expected (seeded: the same every run)
    even = build_train_loader(_config(two_sources, **{"data.weights": "1::1"}), 0, 1, epoch=0)
    share = sum(k.startswith("a") for b in even for k in b["key"]) / 512
    assert 0.35 < share < 0.65 and share < from_a / 512


def test_mixing_is_deterministic_and_resumes_exactly(two_sources):
    config = _config(two_sources, **{"data.samples_per_epoch": 160})
    full = list(build_train_loader(config, 0, 1, epoch=3))
    again = list(build_train_loader(config, 0, 1, epoch=3))
    assert [b["key"] for b in full] == [b["key"] for b in again]
    resumed = list(build_train_loader(config, 0, 1, epoch=3, start_batch=3))
    assert len(resumed) == len(full) - 3
    for a, b in zip(full[3:], resumed):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"])
    other_seed = list(build_train_loader(_config(two_sources, **{"data.samples_per_epoch": 160, "train.seed": 6}),
                                         0, 1, epoch=3))
    assert [b["key"] for b in full] != [b["key"] for b in other_seed]


def test_weights_need_resampling_and_one_per_source(two_sources):
    with pytest.raises(ConfigError, match="data.resampled=true"):
        build_train_loader(_config(two_sources, **{"data.resampled": False}), 0, 1, 0)
    with pytest.raises(ConfigError, match=r"'data.weights' gives 3 weight\(s\) for the 2"):
        build_train_loader(_config(two_sources, **{"data.weights": "1::2::3"}), 0, 1, 0)
    with pytest.raises(ConfigError, match="'data.weights'"):
        build_train_loader(_config(two_sources, **{"data.weights": "1::x"}), 0, 1, 0)


@pytest.mark.heavy
def test_the_trainer_logs_each_sources_samples_to_tensorboard(tmp_path):
    from tests.helpers.processes import launch, wait_all
    from tests.helpers.tiny import scalar_events, tiny_overrides, write_toy_shards

    data = {"train": write_toy_shards(tmp_path / "a", num_shards=2, per_shard=16, seed=0) + "::"
            + write_toy_shards(tmp_path / "b", num_shards=2, per_shard=16, seed=1),
            "val": write_toy_shards(tmp_path / "val", num_shards=1, per_shard=16, seed=2)}
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(data, run_dir, **{"data.weights": "3::1", "data.resampled": True,
                                                 "data.samples_per_epoch": 64, "train.max_steps": 4})
    assert wait_all(launch(overrides, log_dir=tmp_path), timeout=600) == [0], (tmp_path / "rank0.out").read_text()
    events = scalar_events(run_dir)
    a, b = dict(events["data/source0_samples"]), dict(events["data/source1_samples"])
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert [a[s] + b[s] for s in range(1, 5)] == [16, 32, 48, 64]  # every sample of every step, from one source
    assert a[4] > b[4]
