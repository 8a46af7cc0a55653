"""Benchmark the training input pipeline: ours, an earlier checkout of ours, and OpenCLIP's webdataset pipeline,
side by side on the same shards with the same workers and transforms.

    python tools/bench_data.py                                  # 2,048 photo-like 256-px JPEGs, batch 64, crop 224
    python tools/bench_data.py --workers 0 2 --before-checkout /path/to/alignclip-before

The shards hold synthetic "photo-like" images (1/f noise: several octaves of smooth noise plus fine grain, JPEG
quality 90), whose size and decode cost resemble img2dataset's 256-px CC12M output far better than flat drawings.
Each case runs in a fresh process (clean CPU accounting) and reports samples/s between the first and the last
batch, seconds to the first batch, CPU ms per sample over all its processes (workers included) and the bytes of
one batch handed from the workers to the trainer:

* ``ours``: ``build_train_loader`` of this checkout; uint8 batches, normalised after the hand-over (on the device
  in training; here on the CPU, counted, so the comparison is fair).
* ``before``: the same measurement with ``--before-checkout DIR`` importing alignclip from DIR (e.g. a worktree
  of an earlier commit): float32 batches normalised in the workers.
* ``openclip``: ``open_clip_train.data.get_wds_dataset`` (the open-clip-torch wheel) with its training transform
  (RandomResizedCrop scale (0.9, 1.0), bicubic, CLIP mean/std, as ours) and tokenizer.

A single-process breakdown per stage (tar read, decode, crop + resize, normalise, tokenise) says where the time
goes. Figures only: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import json
import subprocess


def photo_like(rng: np.random.Generator, side: int) -> Image.Image:
    """Octaves of upsampled noise with 1/f amplitudes: smooth regions, edges and texture, like a photograph."""
    img = np.zeros((side, side, 3), np.float32)
    for octave, cells in enumerate((4, 8, 16, 32, 64)):
        coarse = rng.normal(0, 1, (cells, cells, 3)).astype(np.float32)
        layer = np.asarray(Image.fromarray(coarse[..., 0]).resize((side, side), Image.Resampling.BICUBIC))
        tint = np.stack([np.asarray(Image.fromarray(coarse[..., c]).resize((side, side), Image.Resampling.BICUBIC))
                         for c in range(3)], -1) if octave < 2 else layer[..., None]
        img += tint * (60.0 / (octave + 1))
    img += rng.normal(0, 6, img.shape)
    return Image.fromarray(np.clip(img + 128, 0, 255).astype(np.uint8), "RGB")


def write_bench_shards(out: Path, num_shards: int, per_shard: int, side: int) -> float:
    from alignclip.data.writer import ShardWriter, sample_key

    sizes = []
    words = ["a", "photo", "of", "the", "red", "dog", "on", "beach", "with", "friends", "at", "sunset", "city"]
    for shard in range(num_shards):
        path = out / f"{shard:05d}.tar"
        with ShardWriter(path) as writer:
            for i in range(per_shard):
                rng = np.random.default_rng([shard, i])
                buf = io.BytesIO()
                photo_like(rng, side).save(buf, format="JPEG", quality=90)
                sizes.append(len(buf.getvalue()))
                caption = " ".join(words[j] for j in rng.integers(len(words), size=int(rng.integers(5, 20))))
                key = sample_key(shard, i, per_shard)
                writer.write(key, {"jpg": buf.getvalue(), "txt": caption, "json": {"key": key}})
    return float(np.mean(sizes))


def _cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the DataLoader workers, once they have exited)."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def _tensor_bytes(batch) -> int:
    values = batch.values() if isinstance(batch, dict) else batch
    return sum(v.element_size() * v.nelement() for v in values if isinstance(v, torch.Tensor))


def _ours(spec: str, workers: int, samples: int, batch: int, image_size: int):
    """This checkout's (or ``--before-checkout``'s) loader: batches and the number of samples in each."""
    from alignclip.config import load_config
    from alignclip.data import build_train_loader

    config = load_config(None, [f"data.train={spec}", f"data.workers={workers}", f"data.samples_per_epoch={samples}",
                                f"train.global_batch_size={batch}", f"model.vision.image_size={image_size}"])
    scale = shift = None
    for b in build_train_loader(config, 0, 1, epoch=0):
        moved = _tensor_bytes(b)
        images = b["image"]
        if images.dtype == torch.uint8:  # normalised where the model runs (the trainer: on the device)
            if scale is None:
                from alignclip.data.transforms import CLIP_MEAN, CLIP_STD

                scale = torch.tensor([1 / (255 * s) for s in CLIP_STD]).view(1, 3, 1, 1)
                shift = torch.tensor([m / s for m, s in zip(CLIP_MEAN, CLIP_STD)]).view(1, 3, 1, 1)
            images = images.float() * scale - shift
        yield len(b["key"]), moved


def _openclip(spec: str, workers: int, samples: int, batch: int, image_size: int):
    """OpenCLIP's own webdataset pipeline, built as its training script builds it."""
    from types import SimpleNamespace

    import open_clip
    import open_clip_train.data as ocd
    from open_clip_train.data import get_wds_dataset

    # open_clip_train's group_by_keys_nothrow reads every item's "fname", but webdataset >= 1.0 ends each shard
    # with an empty dict (eof_value={}), a KeyError; drop those markers (the only change to OpenCLIP's pipeline).
    expander = ocd.tar_file_expander
    ocd.tar_file_expander = lambda *a, **k: (item for item in expander(*a, **k) if item)

    preprocess = open_clip.image_transform(image_size, is_train=True)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    args = SimpleNamespace(train_data=spec, val_data=None, train_num_samples=samples, dataset_resampled=False,
                           train_data_upsampling_factors=None, batch_size=batch, workers=workers, world_size=1,
                           seed=0, distributed=False)
    info = get_wds_dataset(args, preprocess, is_train=True, epoch=0, tokenizer=tokenizer)
    for images, texts in info.dataloader:
        yield images.shape[0], _tensor_bytes((images, texts))


def run_case(case: str, spec: str, workers: int, samples: int, batch: int, image_size: int) -> dict:
    """One measurement in this process: samples/s between the first and the last batch, seconds to the first
    batch, CPU ms per sample over this process and its workers, bytes per batch handed over."""
    source = _openclip if case == "openclip" else _ours
    torch.set_num_threads(1)
    cpu_start, start = _cpu_seconds(), time.perf_counter()
    first = first_count = None
    count, moved = 0, 0
    for n, nbytes in source(spec, workers, samples, batch, image_size):
        count += n
        moved = max(moved, nbytes)
        if first is None:
            first, first_count = time.perf_counter(), count
    end = time.perf_counter()
    time.sleep(0.5)  # let the workers exit and be reaped, so their CPU time is counted
    return {"rate": (count - first_count) / max(end - first, 1e-9), "startup": first - start,
            "epoch_rate": count / (end - start),
            "cpu_ms": (_cpu_seconds() - cpu_start) * 1000 / count, "bytes": moved, "samples": count}


def case_in_subprocess(case: str, spec: str, workers: int, samples: int, batch: int, image_size: int,
                       pythonpath: str = "") -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    result = subprocess.run([sys.executable, __file__, "--case", case, "--spec", spec, "--workers", str(workers),
                             "--samples", str(samples), "--batch-size", str(batch), "--image-size", str(image_size)],
                            capture_output=True, text=True, env=env, timeout=3600)
    if result.returncode:
        return {"error": (result.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def stage_breakdown(spec: str, n: int, image_size: int, batch: int) -> dict[str, float]:
    """CPU milliseconds per sample of each stage, in this process, one thread (CPU time, not wall time, so other
    load on the machine inflates it less)."""
    from alignclip.data import images as I
    from alignclip.data import shards as shardlib
    from alignclip.data import transforms as T
    from alignclip.tokenizer import get_tokenizer

    shard_list = shardlib.expand_spec(spec)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.process_time()
    raws = []
    for shard in shard_list:
        raws += list(shardlib.iter_raw_samples(shard))
        if len(raws) >= n:
            break
    raws = raws[:n]
    t1 = time.process_time()
    rng = np.random.default_rng(0)
    decoded = [I.load_rgb(r["jpg"], min_size=image_size) for r in raws]
    t2 = time.process_time()
    pixels = [T.train_transform(img, image_size, T.crop_draws(rng)) for img in decoded]
    t3 = time.process_time()
    for i in range(0, n, batch):
        T.stack_uint8(pixels[i:i + batch])
    t4 = time.process_time()
    tokenizer = get_tokenizer()
    captions = [r["txt"].decode() for r in raws]
    for i in range(0, n, batch):
        tokenizer(captions[i:i + batch])
    t5 = time.process_time()
    for r in raws:
        I.check_decodable(r["jpg"])
    t6 = time.process_time()
    torch.set_num_threads(torch_threads)
    ms = 1000.0 / n
    return {"tar read": (t1 - t0) * ms, "JPEG decode": (t2 - t1) * ms, "crop + bicubic resize": (t3 - t2) * ms,
            "uint8 batch (per batch)": (t4 - t3) * ms, "tokenise (per batch)": (t5 - t4) * ms,
            "resume check (1/8-scale decode)": (t6 - t5) * ms}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--source-size", type=int, default=256, help="side of the stored JPEGs")
    parser.add_argument("--image-size", type=int, default=224, help="model input side (the crop)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--dir", default="", help="keep the shards here (default: a temporary folder)")
    parser.add_argument("--before-checkout", default="",
                        help="a checkout of an earlier alignclip to measure as 'before' (its folder on PYTHONPATH)")
    parser.add_argument("--case", choices=("ours", "openclip"), help=argparse.SUPPRESS)  # one measurement, JSON out
    parser.add_argument("--spec", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args.case, args.spec, args.workers[0], args.samples, args.batch_size,
                                  args.image_size)))
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.dir or tmp)
        out.mkdir(parents=True, exist_ok=True)
        per_shard = args.samples // args.shards
        start = time.perf_counter()
        existing = [out / f"{i:05d}.tar" for i in range(args.shards)]
        if args.dir and all(p.exists() for p in existing):  # reuse shards written by an earlier run
            from alignclip.data.shards import iter_raw_samples

            mean_bytes = float(np.mean([len(r["jpg"]) for r in iter_raw_samples(str(existing[0]))]))
        else:
            mean_bytes = write_bench_shards(out, args.shards, per_shard, args.source_size)
        spec = str(out / f"{{00000..{args.shards - 1:05d}}}.tar")
        total = per_shard * args.shards
        print(f"{total} samples of {args.source_size}-px JPEG (mean {mean_bytes / 1024:.1f} KiB) in {args.shards} "
              f"shards, written in {time.perf_counter() - start:.1f} s; batch {args.batch_size}, crop to "
              f"{args.image_size}, {os.cpu_count()} CPU(s)\n")

        print("stage (one thread)               CPU ms/sample")
        stages = stage_breakdown(spec, min(512, total), args.image_size, args.batch_size)
        for name, value in stages.items():
            print(f"  {name:32s} {value:8.3f}")
        per_sample = sum(v for k, v in stages.items() if not k.startswith("resume"))
        cores = os.cpu_count() or 1
        print(f"  {'total (training path)':32s} {per_sample:8.3f}  -> ceiling {1000 / per_sample:.0f} samples/s "
              f"per core, {cores * 1000 / per_sample:.0f} on {cores} idle cores")
        print(f"\nload average before the loader runs: {os.getloadavg()[0]:.2f} on {cores} cores")
        print()
        cases = [("ours", "")] + ([("before", args.before_checkout)] if args.before_checkout else []) + \
            [("openclip", "")]
        print("workers  case       samples/s  epoch samples/s  first batch (s)  CPU ms/sample  MB/batch moved  "
              "ours vs it (samples/s, epoch)")
        for workers in args.workers:
            results = {}
            for case, path in cases:
                results[case] = r = case_in_subprocess("openclip" if case == "openclip" else "ours", spec,
                                                       workers, total, args.batch_size, args.image_size, path)
                if "error" in r:
                    print(f"{workers:7d}  {case:9s}  failed: {r['error']}")
                    continue
                ours = results["ours"]
                ratio = (f"{ours['rate'] / r['rate']:.2f}x, {ours['epoch_rate'] / r['epoch_rate']:.2f}x"
                         if case != "ours" and "rate" in ours else "")
                print(f"{workers:7d}  {case:9s}  {r['rate']:9.0f}  {r['epoch_rate']:15.0f}  {r['startup']:15.2f}  "
                      f"{r['cpu_ms']:13.2f}  {r['bytes'] / 2**20:14.2f}  {ratio}")
        print("\n(samples/s: between the first and the last batch; epoch samples/s: from building the loader to the "
              "last batch, start-up included (OpenCLIP fills a 1,000-sample shuffle buffer before its first batch); "
              "ours vs it: ours' rates over that case's; every case in a fresh process with OMP_NUM_THREADS=1, one "
              "after the other, on the same shards)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
