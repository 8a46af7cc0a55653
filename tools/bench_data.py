"""Benchmark the training input pipeline: decoded + augmented + tokenised samples/s with 0, 1 and 2 workers.

    python tools/bench_data.py                       # 2,048 photo-like 256-px JPEGs, batch 64, crop to 224
    python tools/bench_data.py --samples 4096 --workers 0 1 2 4

The shards hold synthetic "photo-like" images (1/f noise: several octaves of smooth noise plus fine grain, JPEG
quality 90), whose size and decode cost resemble img2dataset's 256-px CC12M output far better than flat drawings.
Throughput is measured on the real loader (``build_train_loader``) between the first and the last batch, so worker
start-up is reported apart. A single-process breakdown per stage (tar read, JPEG decode, crop + bicubic resize,
normalise, tokenise) says where the time goes.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing


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


def loader_throughput(spec: str, workers: int, samples: int, batch: int, image_size: int
                      ) -> tuple[float, float, float]:
    """(samples/s between the first and the last batch, seconds to the first batch, CPU ms per sample over all
    processes: the cost that decides the rate on idle cores)."""
    from alignclip.config import load_config
    from alignclip.data import build_train_loader

    config = load_config(None, [f"data.train={spec}", f"data.workers={workers}", f"data.samples_per_epoch={samples}",
                                f"train.global_batch_size={batch}", f"model.vision.image_size={image_size}"])
    cpu_start, start = _cpu_seconds(), time.perf_counter()
    loader = build_train_loader(config, 0, 1, epoch=0)
    first = None
    count = 0
    for b in loader:
        count += len(b["key"])
        if first is None:
            first, first_count = time.perf_counter(), count
    end = time.perf_counter()
    del b, loader
    time.sleep(0.5)  # let the workers exit and be reaped, so their CPU time is counted
    cpu_ms = (_cpu_seconds() - cpu_start) * 1000 / count
    return (count - first_count) / (end - first), first - start, cpu_ms


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
        T.normalize_batch(pixels[i:i + batch])
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
            "normalise (per batch)": (t4 - t3) * ms, "tokenise (per batch)": (t5 - t4) * ms,
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
    args = parser.parse_args(argv)
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
        print("workers   samples/s   vs 0 workers   first batch after (s)   CPU ms/sample   idle-core estimate")
        baseline = None
        for workers in args.workers:
            rate, startup, cpu_ms = loader_throughput(spec, workers, total, args.batch_size, args.image_size)
            baseline = baseline or rate
            usable_cores = min(cores, max(workers, 1))
            print(f"{workers:7d}   {rate:9.0f}   {rate / baseline:12.2f}x   {startup:21.2f}   {cpu_ms:13.2f}   "
                  f"{usable_cores * 1000 / cpu_ms:12.0f}/s")
        print("\n(idle-core estimate: min(cores, max(workers, 1)) / CPU time per sample; the measured rate falls "
              "below it when other processes hold the cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
