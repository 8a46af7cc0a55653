"""The shard pipeline: round trip, determinism, the per-epoch split, resume by start_batch, skipped samples."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from alignclip.config import ConfigError, load_config
from alignclip.data import build_eval_batch, build_train_loader
from alignclip.data import generated as G
from alignclip.data import images as images_mod
from alignclip.data.shards import expand_spec
from alignclip.data.transforms import denormalize, normalize_on_device
from alignclip.data.writer import ShardWriter
from alignclip.tokenizer import get_tokenizer

IMAGE_SIZE = 32


def _config(train: str, **overrides):
    base = {"data.train": train, "model.vision.image_size": IMAGE_SIZE, "model.vision.patch_size": 16,
            "train.global_batch_size": 16, "data.workers": 2, "data.shuffle_buffer": 100, "train.seed": 3}
    base.update(overrides)
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


@pytest.fixture(scope="module")
def eight_shards(tmp_path_factory) -> Path:
    """8 shards x 16 generated samples, with a fake fp16 embedding (KEY.sem.npy) derived from the key."""
    out = tmp_path_factory.mktemp("shards")
    for shard in range(8):
        with ShardWriter(out / f"{shard:05d}.tar") as writer:
            for i in range(16):
                key = f"{shard * 16 + i:09d}"
                scene = G.sample_scene(G.scene_rng(0, "train", shard * 16 + i), IMAGE_SIZE)
                writer.write(key, {"jpg": G.jpeg_bytes(G.render(scene)), "txt": scene.caption(),
                                   "json": {"key": key}, "sem.npy": _fake_embedding(key)})
    return out


def _fake_embedding(key: str) -> np.ndarray:
    return np.random.default_rng(int(key)).standard_normal(8).astype(np.float16)


def _epoch(config, rank=0, world=1, epoch=0, start_batch=0) -> list[dict]:
    return list(build_train_loader(config, rank, world, epoch, start_batch))


def test_round_trip_shapes_dtypes_tokens_and_embeddings(eight_shards):
    loader = build_train_loader(_config(str(eight_shards)), 0, 1, 0)
    assert len(loader) == 128 // 16 and loader.has_semantic
    batches = list(loader)
    assert len(batches) == len(loader)
    tokenizer = get_tokenizer()
    for batch in batches:
        assert batch["image"].shape == (16, 3, IMAGE_SIZE, IMAGE_SIZE) and batch["image"].dtype == torch.uint8
        assert batch["text"].shape == (16, 77) and batch["text"].dtype == torch.int64
        assert torch.equal(batch["text"], tokenizer(batch["caption"]))
        assert (batch["text"][:, 0] == 49406).all()
        assert batch["semantic"].dtype == torch.float32 and batch["semantic"].shape == (16, 8)
        expected = np.stack([_fake_embedding(k) for k in batch["key"]]).astype(np.float32)
        assert np.array_equal(batch["semantic"].numpy(), expected)
        pixels = denormalize(normalize_on_device(batch["image"]))  # uint8 from the workers, normalised on device
        assert pixels.min() > -0.02 and pixels.max() < 1.02  # CLIP mean/std applied, and only that
    assert loader.stats()["batches"] == 8 and loader.stats()["corrupt_image"] == 0


def test_eval_batch_is_the_image_centre_cropped_with_its_caption(eight_shards):
    batch = build_eval_batch(_config(str(eight_shards), **{"data.val": str(eight_shards)}), 5)
    assert batch["key"] == [f"{i:09d}" for i in range(5)]  # in shard order, no shuffle
    with tarfile.open(eight_shards / "00000.tar") as tar:
        source = Image.open(io.BytesIO(tar.extractfile("000000003.jpg").read())).convert("RGB")
        caption = tar.extractfile("000000003.txt").read().decode()
    assert batch["caption"][3] == caption
    # Same size in and out: the eval transform is an identity resize of the full square.
    got = (denormalize(batch["image"][3:4])[0].permute(1, 2, 0).numpy() * 255).round()
    assert np.abs(got - np.asarray(source, np.float32)).max() <= 2


def test_same_seed_and_epoch_give_identical_batches_and_a_new_epoch_differs(eight_shards):
    config = _config(str(eight_shards))
    first, again, next_epoch = _epoch(config), _epoch(config), _epoch(config, epoch=1)
    assert [b["key"] for b in first] == [b["key"] for b in again]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first, again))  # augmentation included
    assert [b["key"] for b in first] != [b["key"] for b in next_epoch]
    other_seed = _epoch(_config(str(eight_shards), **{"train.seed": 4}))
    assert [b["key"] for b in first] != [b["key"] for b in other_seed]


def test_plain_list_gives_every_sample_exactly_once_across_2_nodes_x_2_workers(eight_shards):
    config = _config(str(eight_shards))  # 128 samples, global batch 16: 8 batches of 8 per rank
    keys = []
    for rank in range(2):
        loader = build_train_loader(config, rank, 2, epoch=5)
        batches = list(loader)
        assert len(batches) == len(loader) == 8
        assert all(len(b["key"]) == 8 for b in batches)
        assert loader.stats()["wrapped_passes"] == 0
        keys += [k for b in batches for k in b["key"]]
    assert sorted(keys) == [f"{i:09d}" for i in range(128)]


def test_start_batch_resumes_exactly_where_an_uninterrupted_epoch_was(eight_shards):
    config = _config(str(eight_shards), **{"train.global_batch_size": 8})  # 16 batches per epoch
    full = _epoch(config, epoch=2)
    for start in (3, 8):  # an odd start rotates the worker order, an even one does not
        resumed = _epoch(config, epoch=2, start_batch=start)
        assert len(resumed) == len(full) - start
        for a, b in zip(full[start:], resumed):
            assert a["key"] == b["key"] and torch.equal(a["image"], b["image"]) and torch.equal(a["text"], b["text"])
    assert _epoch(config, epoch=2, start_batch=16) == []


def test_resampled_lists_wrap_to_the_known_length_deterministically(eight_shards):
    config = _config(str(eight_shards), **{"data.resampled": True, "data.samples_per_epoch": 400})
    first, again = _epoch(config), _epoch(config)
    assert len(first) == 400 // 16
    assert [b["key"] for b in first] == [b["key"] for b in again]


def test_fewer_shards_than_readers_is_a_clear_error_naming_the_keys(eight_shards):
    spec = str(eight_shards / "{00000..00002}.tar")
    with pytest.raises(ConfigError, match=r"data\.train.*3 shard.*data\.workers"):
        build_train_loader(_config(spec), 0, 2, 0)


def test_brace_patterns_folders_and_source_lists_expand_in_order(eight_shards):
    folder = sorted(str(p) for p in eight_shards.glob("*.tar"))
    assert expand_spec(str(eight_shards)) == folder
    assert expand_spec(str(eight_shards / "{00006..00007}.tar") + "::" + str(eight_shards / "0000{0,1}.tar")) == \
        folder[6:8] + folder[0:2]
    with pytest.raises(FileNotFoundError, match="matches no"):
        expand_spec(str(eight_shards / "nothing-*.tar"))


# ------------------------------------------------------------------------------------------ damaged data
@pytest.fixture(scope="module")
def damaged_shards(tmp_path_factory) -> tuple[Path, set[str]]:
    """Shard A: 16 samples of which 0 is garbage bytes, 1 a truncated JPEG, 2 an empty caption. Shard B: a tar cut
    in the middle of sample 7's image (samples 0..6 survive). Shard C: not a tar at all."""
    out = tmp_path_factory.mktemp("damaged")
    good = set()
    for name in ("A", "B"):
        with ShardWriter(out / f"{name}.tar") as writer:
            for i in range(16):
                key = f"{name}{i:03d}"
                scene = G.sample_scene(G.scene_rng(1, "train", i + (100 if name == "B" else 0)), IMAGE_SIZE)
                jpg, caption = G.jpeg_bytes(G.render(scene)), scene.caption()
                if name == "A" and i == 0:
                    jpg = b"this is not a jpeg" * 10
                elif name == "A" and i == 1:
                    jpg = jpg[: len(jpg) // 2]
                elif name == "A" and i == 2:
                    caption = "   "
                elif name == "A" or i < 7:
                    good.add(key)
                writer.write(key, {"jpg": jpg, "txt": caption})
    with tarfile.open(out / "B.tar") as tar:
        cut = next(m for m in tar.getmembers() if m.name == "B007.jpg").offset_data + 50
    (out / "B.tar").write_bytes((out / "B.tar").read_bytes()[:cut])
    (out / "C.tar").write_bytes(b"garbage" * 100)
    return out, good


def test_corrupt_jpeg_truncated_tar_and_empty_caption_are_skipped_and_counted(damaged_shards):
    folder, good = damaged_shards
    assert len(good) == 13 + 7
    # One reader (in a worker process) that needs exactly the 20 usable samples, and no shuffle, so the bad samples
    # (first in A) are all reached before the quota is.
    config = _config(str(folder), **{"data.workers": 1, "train.global_batch_size": 4, "data.samples_per_epoch": 20,
                                     "data.shuffle_buffer": 1})
    loader = build_train_loader(config, 0, 1, 0)
    batches = list(loader)
    assert sorted(k for b in batches for k in b["key"]) == sorted(good)
    stats = loader.stats()
    assert (stats["corrupt_image"], stats["empty_caption"], stats["truncated_shard"], stats["unreadable_shard"]) \
        == (2, 1, 1, 1)
    assert stats["samples_read"] == 16 + 7 and stats["batches"] == 5
    # Skipping checks images without decoding them, yet lands on the same batches.
    resumed = list(build_train_loader(config, 0, 1, 0, start_batch=2))
    assert [b["key"] for b in resumed] == [b["key"] for b in batches[2:]]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(batches[2:], resumed))


def test_uneven_shards_still_give_every_rank_the_same_number_of_full_batches(tmp_path):
    for shard, size in enumerate((5, 9, 20, 30)):
        G.write_split(tmp_path, "train", 1, size, IMAGE_SIZE, seed=shard, prefix=f"s{shard}-")
    config = _config(str(tmp_path), **{"data.workers": 1, "train.global_batch_size": 8})  # 64 samples: 8 x 4 x 2
    stats = []
    for rank in range(2):
        loader = build_train_loader(config, rank, 2, epoch=0)
        batches = list(loader)
        assert len(loader) == len(batches) == 8 and all(len(b["key"]) == 4 for b in batches)
        stats.append(loader.stats())
    # The reader holding the small shards read them again (a second pass); the other stopped at its quota.
    assert sorted(s["wrapped_passes"] > 0 for s in stats) == [False, True]


def test_eval_batch_falls_back_to_the_last_training_shard_without_a_val_split(eight_shards):
    batch = build_eval_batch(_config(str(eight_shards)), 4)
    assert batch["key"] == [f"{7 * 16 + i:09d}" for i in range(4)]


def _rank_reads_its_share(rank: int, world_size: int, folder: str) -> dict:
    from alignclip.data import reduce_stats

    loader = build_train_loader(_config(folder, **{"data.workers": 0}), rank, world_size, epoch=1)
    keys = [k for batch in loader for k in batch["key"]]
    return {"keys": keys, "local": loader.stats(), "total": reduce_stats(loader.stats())}


@pytest.mark.heavy
def test_two_real_ranks_split_the_epoch_and_sum_their_counts(eight_shards):
    from tests.helpers.ranks import run_on_ranks

    results = run_on_ranks(_rank_reads_its_share, 2, str(eight_shards))
    assert sorted(results[0]["keys"] + results[1]["keys"]) == [f"{i:09d}" for i in range(128)]
    assert results[0]["total"] == results[1]["total"]
    assert results[0]["total"]["samples_read"] == sum(r["local"]["samples_read"] for r in results) == 128


# ------------------------------------------------------------------------------------- data.decode: gpu
def _encoded(kind: str, rng: np.random.Generator) -> bytes:
    """Web images of each kind the loader meets, 40-70 px, non-square, photo-like noise on colour fields."""
    width, height = int(rng.integers(40, 70)), int(rng.integers(40, 70))
    base = np.asarray(Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)).resize((width, height)))
    rgb = np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    if kind == "png_alpha":
        alpha = np.linspace(0, 255, width, dtype=np.uint8)[None].repeat(height, 0)
        Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(buf, format="PNG")
    elif kind == "corrupt":
        Image.fromarray(rgb).save(buf, format="JPEG")
        return buf.getvalue()[: len(buf.getvalue()) // 2]
    else:
        mode, fmt = {"jpeg": ("RGB", "JPEG"), "progressive": ("RGB", "JPEG"), "webp": ("RGB", "WEBP"),
                     "cmyk": ("CMYK", "JPEG"), "grey": ("L", "JPEG")}[kind]
        Image.fromarray(rgb).convert(mode).save(buf, format=fmt, quality=90, progressive=kind == "progressive")
    return buf.getvalue()


MIXED_KINDS = ("jpeg", "jpeg", "progressive", "png_alpha", "jpeg", "webp", "cmyk", "jpeg", "grey", "corrupt")


@pytest.fixture(scope="module")
def mixed_shards(tmp_path_factory) -> Path:
    """4 shards x 10 samples: YCbCr JPEGs (baseline and progressive), a PNG with alpha, a WebP, a CMYK and a
    greyscale JPEG, and a truncated JPEG; captions with duplicates and non-ASCII text."""
    out = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(11)
    for shard in range(4):
        with ShardWriter(out / f"{shard:05d}.tar") as writer:
            for i, kind in enumerate(MIXED_KINDS):
                key = f"{shard}{i:03d}"
                writer.write(key, {"png" if kind == "png_alpha" else "webp" if kind == "webp" else "jpg":
                                   _encoded(kind, rng), "txt": f"{kind} n°{i % 3} — ein Bild"})
    return out


def _gpu_decoded(batches: list[dict]) -> list[torch.Tensor]:
    from alignclip.data.device_decode import device_images

    return [device_images(b, "cpu") for b in batches]


def test_gpu_decode_on_cpu_tensors_gives_the_cpu_paths_batches_and_counts(mixed_shards):
    config = _config(str(mixed_shards), **{"train.global_batch_size": 4, "data.samples_per_epoch": 32})
    cpu_loader = build_train_loader(config, 0, 1, 0)
    cpu = list(cpu_loader)
    gpu_loader = build_train_loader(_config(str(mixed_shards), **{"train.global_batch_size": 4,
                                                                  "data.samples_per_epoch": 32,
                                                                  "data.decode": "gpu"}), 0, 1, 0)
    gpu = list(gpu_loader)
    assert [b["key"] for b in gpu] == [b["key"] for b in cpu] and len(gpu) == 8
    assert gpu_loader.stats() == cpu_loader.stats() and cpu_loader.stats()["corrupt_image"] >= 1
    carried = {"jpeg": 0, "pixels": 0}
    for batch, reference in zip(gpu, cpu):
        lengths = batch["jpeg_offsets"].diff().tolist()
        for key, length in zip(batch["key"], lengths):
            kind = MIXED_KINDS[int(key[1:])]
            assert (length > 0) == (kind in ("jpeg", "progressive")), kind  # other kinds decode in the worker
            carried["jpeg" if length else "pixels"] += 1
        in_worker = [i for i, length in enumerate(lengths) if length == 0]  # their pixels travel, in batch order
        assert torch.equal(batch["image"], reference["image"][in_worker])
    assert carried["jpeg"] and carried["pixels"]
    # The device path (here: torchvision's decoder on CPU tensors) gives the CPU path's pixels.
    for a, decoded in zip(cpu, _gpu_decoded(gpu)):
        assert decoded.dtype == torch.uint8 and decoded.shape == a["image"].shape
        assert torch.equal(decoded, a["image"])  # both libjpeg-turbo, islow IDCT, fancy upsampling, no DCT scaling here
    assert all(torch.equal(a["text"], b["text"]) for a, b in zip(cpu, gpu))


def test_gpu_decode_resumes_exactly_with_2_workers(mixed_shards):
    config = _config(str(mixed_shards), **{"train.global_batch_size": 4, "data.samples_per_epoch": 32,
                                           "data.decode": "gpu"})
    full = _epoch(config, epoch=1)
    for start in (3, 4):
        resumed = _epoch(config, epoch=1, start_batch=start)
        assert [b["key"] for b in resumed] == [b["key"] for b in full[start:]]
        for a, b in zip(full[start:], resumed):
            assert all(torch.equal(a[k], b[k]) for k in ("image", "jpeg", "jpeg_offsets", "crop", "text"))
        assert all(torch.equal(x, y) for x, y in zip(_gpu_decoded(full[start:]), _gpu_decoded(resumed)))


def test_device_decode_falls_back_image_by_image_when_the_batched_decoder_refuses():
    from alignclip.data import device_decode

    rng = np.random.default_rng(3)
    good = _encoded("jpeg", rng)
    encoded = [torch.frombuffer(bytearray(good), dtype=torch.uint8), torch.tensor([1, 2, 3], dtype=torch.uint8)]
    with pytest.raises(images_mod.DecodeError):  # neither decoder takes garbage: a clear error, not a silent hole
        device_decode.decode_jpegs(encoded, torch.device("cpu"))
    decoded = device_decode.decode_jpegs(encoded[:1], torch.device("cpu"))
    assert torch.equal(decoded[0].permute(1, 2, 0), torch.from_numpy(np.array(images_mod.load_rgb(good))))


def test_the_trainer_decodes_a_gpu_batch_where_the_model_runs(mixed_shards):
    from types import SimpleNamespace

    from alignclip.training.components import Components
    from alignclip.training.fast_path import resolve_fast_path

    base = {"train.global_batch_size": 4, "data.samples_per_epoch": 8, "data.workers": 0}
    cpu = _epoch(_config(str(mixed_shards), **base))
    gpu = _epoch(_config(str(mixed_shards), **base, **{"data.decode": "gpu"}))
    host = SimpleNamespace(device=torch.device("cpu"), input_dtype=torch.float32,
                           fast=resolve_fast_path(_config(str(mixed_shards)), "cpu"))
    for a, b in zip(cpu, gpu):
        images, tokens = Components.to_device(host, b)
        assert torch.equal(images, normalize_on_device(a["image"])) and torch.equal(tokens, a["text"])
