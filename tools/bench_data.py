"""Benchmark the training input pipeline: this checkout (``decode: cpu`` and ``gpu``), today's main (an earlier
commit of ours) and OpenCLIP's webdataset pipeline, side by side in one run on the same shards and transforms,
and the plan table of docs/data.md.

    python tools/bench_data.py                          # 2,048 photo-like 256-px JPEGs, batch 64, crop 224
    python tools/bench_data.py --workers 0 2 --before-commit c85906b --plan-sizes 256 512

The shards hold synthetic "photo-like" images (1/f noise: several octaves of smooth noise plus fine grain, JPEG
quality 90), whose size and decode cost resemble img2dataset's CC12M output far better than flat drawings.
Every measurement runs in a fresh process (clean CPU accounting, one thread, OMP_NUM_THREADS=1):

1. **Stages** (CPU ms per sample, one thread, ``time.process_time``): read (tar members), decode, crop + resize,
   tokenise, collate, for each pipeline with its own code: ``ours`` (libjpeg-turbo decode with DCT scaling, torch's
   uint8 bicubic), ``ours gpu`` (what the workers still do with ``data.decode: gpu``: read, check the JPEG at 1/8
   scale and draw its crop, tokenise, pack the bytes), ``before`` (the ``--before-commit`` checkout, extracted with
   ``git archive`` into a temporary folder: PIL decode in draft mode, one PIL crop + resize call) and
   ``openclip`` (webdataset's tar reader as open_clip_train uses it, PIL decode, its training transform, which
   also converts to float and normalises, its tokenizer per sample, ``torch.stack``), in ``--stage-rounds``
   rounds (each runs every case once; the median per stage is printed). The ratio of the totals, ours / before,
   is the figure the CPU path is held to (<= 0.5).
2. **Loaders** with 0, 1, 2 workers: samples/s between the first and the last batch, seconds to the first batch,
   CPU ms per sample over all processes (workers included), bytes per batch handed over. Our uint8 batches are
   normalised in the benchmark's process (on the device in training), counted; ``ours gpu`` hands over JPEG bytes,
   and their decode (on the GPU in training) is not run here.
3. **Plan**: the stages of ``ours`` and ``ours gpu`` for stored images of 256, 384, 512 px and keep-ratio (256 x
   384), samples/s per worker (one core each), and the workers per GPU that the FLOP model's H100 rate (ViT-B/16
   AlignCLIP, ``experiment/cc12m_alignclip``, at 40 % MFU of 989 bf16 TFLOP/s) needs. The device's side of
   ``gpu`` is ``tools/gpu_check.py``'s ``data decode gpu`` row.

Figures only: nothing here asserts a speed. On a shared machine, CPU time inflates less than wall time; run the
cases side by side (as here) and compare ratios.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve()
STAGES = ("read", "decode", "crop + resize", "tokenise", "collate")
PLAN_SIZES = {"256": (256, 256), "384": (384, 384), "512": (512, 512), "keep-ratio": (384, 256)}


def photo_like(rng: np.random.Generator, side: int, height: int | None = None) -> Image.Image:
    """Octaves of upsampled noise with 1/f amplitudes: smooth regions, edges and texture, like a photograph;
    ``side`` x ``height`` (square by default)."""
    width, height = side, height or side
    img = np.zeros((height, width, 3), np.float32)
    for octave, cells in enumerate((4, 8, 16, 32, 64)):
        coarse = rng.normal(0, 1, (cells, cells, 3)).astype(np.float32)
        layer = np.asarray(Image.fromarray(coarse[..., 0]).resize((width, height), Image.Resampling.BICUBIC))
        tint = np.stack([np.asarray(Image.fromarray(coarse[..., c]).resize((width, height), Image.Resampling.BICUBIC))
                         for c in range(3)], -1) if octave < 2 else layer[..., None]
        img += tint * (60.0 / (octave + 1))
    img += rng.normal(0, 6, img.shape)
    return Image.fromarray(np.clip(img + 128, 0, 255).astype(np.uint8), "RGB")


def write_bench_shards(out: Path, num_shards: int, per_shard: int, side: int, height: int | None = None) -> float:
    """Shards of photo-like JPEGs with captions; returns the mean JPEG size in bytes."""
    from alignclip.data.writer import ShardWriter, sample_key

    sizes = []
    words = ["a", "photo", "of", "the", "red", "dog", "on", "beach", "with", "friends", "at", "sunset", "city"]
    for shard in range(num_shards):
        path = out / f"{shard:05d}.tar"
        with ShardWriter(path) as writer:
            for i in range(per_shard):
                rng = np.random.default_rng([shard, i])
                buf = io.BytesIO()
                photo_like(rng, side, height).save(buf, format="JPEG", quality=90)
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


# ---------------------------------------------------------------------------------------------- loaders
def _ours(spec: str, workers: int, samples: int, batch: int, image_size: int, decode: str = "cpu"):
    """This checkout's (or the before checkout's) loader: samples, bytes handed over and CPU seconds of the
    normalisation (done here, on the device in training) per batch."""
    from alignclip.config import load_config
    from alignclip.data import build_train_loader

    overrides = [f"data.train={spec}", f"data.workers={workers}", f"data.samples_per_epoch={samples}",
                 f"train.global_batch_size={batch}", f"model.vision.image_size={image_size}"]
    config = load_config(None, overrides + ([f"data.decode={decode}"] if decode != "cpu" else []))
    scale = shift = None
    for b in build_train_loader(config, 0, 1, epoch=0):
        moved = _tensor_bytes(b)
        images, start = b["image"], time.process_time()
        if images.dtype == torch.uint8 and "jpeg" not in b:  # normalised where the model runs (here: counted)
            if scale is None:
                from alignclip.data.transforms import CLIP_MEAN, CLIP_STD

                scale = torch.tensor([1 / (255 * s) for s in CLIP_STD]).view(1, 3, 1, 1)
                shift = torch.tensor([m / s for m, s in zip(CLIP_MEAN, CLIP_STD)]).view(1, 3, 1, 1)
            images = images.float() * scale - shift
        yield len(b["key"]), moved, time.process_time() - start


def _openclip_wds_patch():
    """open_clip_train's group_by_keys_nothrow reads every item's "fname", but webdataset >= 1.0 ends each shard
    with an empty dict (eof_value={}), a KeyError; drop those markers (the only change to OpenCLIP's pipeline)."""
    import open_clip_train.data as ocd

    if not getattr(ocd.tar_file_expander, "_bench_patched", False):
        expander = ocd.tar_file_expander
        ocd.tar_file_expander = lambda *a, **k: (item for item in expander(*a, **k) if item)
        ocd.tar_file_expander._bench_patched = True
    return ocd


def _openclip(spec: str, workers: int, samples: int, batch: int, image_size: int, decode: str = "cpu"):
    """OpenCLIP's own webdataset pipeline, built as its training script builds it."""
    from types import SimpleNamespace

    import open_clip

    ocd = _openclip_wds_patch()
    preprocess = open_clip.image_transform(image_size, is_train=True)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    args = SimpleNamespace(train_data=spec, val_data=None, train_num_samples=samples, dataset_resampled=False,
                           train_data_upsampling_factors=None, batch_size=batch, workers=workers, world_size=1,
                           seed=0, distributed=False)
    info = ocd.get_wds_dataset(args, preprocess, is_train=True, epoch=0, tokenizer=tokenizer)
    for images, texts in info.dataloader:
        yield images.shape[0], _tensor_bytes((images, texts)), 0.0  # normalised in its workers


def run_case(case: str, spec: str, workers: int, samples: int, batch: int, image_size: int,
             decode: str = "cpu") -> dict:
    """One loader measurement in this process: samples/s between the first and the last batch, seconds to the
    first batch, CPU ms per sample over this process and its workers (and of that, the normalisation of uint8
    batches in this process, which training does on the device), bytes per batch handed over."""
    source = _openclip if case == "openclip" else _ours
    torch.set_num_threads(1)
    cpu_start, start = _cpu_seconds(), time.perf_counter()
    first = first_count = None
    count, moved, normalise_s = 0, 0, 0.0
    for n, nbytes, seconds in source(spec, workers, samples, batch, image_size, decode):
        count += n
        moved = max(moved, nbytes)
        normalise_s += seconds
        if first is None:
            first, first_count = time.perf_counter(), count
    end = time.perf_counter()
    time.sleep(0.5)  # let the workers exit and be reaped, so their CPU time is counted
    return {"rate": (count - first_count) / max(end - first, 1e-9), "startup": first - start,
            "epoch_rate": count / (end - start),
            "cpu_ms": (_cpu_seconds() - cpu_start) * 1000 / count, "normalise_ms": normalise_s * 1000 / count,
            "bytes": moved, "samples": count}


# ----------------------------------------------------------------------------------------------- stages
def _raw_samples(spec: str, n: int) -> list[dict]:
    from alignclip.data import shards as shardlib

    next(shardlib.iter_raw_samples(shardlib.expand_spec(spec)[0]), None)  # lazy imports, untimed
    raws = []
    for shard in shardlib.expand_spec(spec):
        raws += list(shardlib.iter_raw_samples(shard))
        if len(raws) >= n:
            break
    return raws[:n]


def _timed(fn, items) -> tuple[list, float]:
    """``fn`` over ``items`` and its CPU seconds, after one untimed call (lazy imports and first-call set-up, which a
    worker pays once per epoch, are not per-sample costs)."""
    if items:
        fn(items[0])
    start = time.process_time()
    out = [fn(item) for item in items]
    return out, time.process_time() - start


def _batches(items: list, batch: int) -> list[list]:
    return [items[i:i + batch] for i in range(0, len(items), batch)]


def stage_breakdown(case: str, spec: str, n: int, image_size: int, batch: int) -> dict[str, float]:
    """CPU ms per sample of each stage of ``case``'s pipeline, in this process, one thread."""
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    if case == "openclip":
        return _openclip_stages(spec, n, image_size, batch)
    from alignclip.data import images as I
    from alignclip.data import transforms as T
    from alignclip.tokenizer import get_tokenizer

    start = time.process_time()
    raws = _raw_samples(spec, n)
    read_s = time.process_time() - start
    draws = [T.crop_draws(rng) for _ in raws]
    times = {"read": read_s}
    if case == "ours gpu":  # the workers' share of data.decode=gpu: check + crop box, then pack the bytes
        from alignclip.data import device_decode

        crops, times["decode"] = _timed(lambda rd: device_decode.compressed_crop(rd[0]["jpg"], rd[1]),
                                        list(zip(raws, draws)))
        times["crop + resize"] = 0.0
        collate = lambda items: device_decode.pack(items, image_size)  # noqa: E731
        pixels = crops
    elif hasattr(T, "train_pixels"):  # this checkout
        decoded, times["decode"] = _timed(
            lambda rd: I.decode_for_crop(rd[0]["jpg"], lambda w, h, d=rd[1]: T.random_resized_crop_box(w, h, d),
                                         image_size), list(zip(raws, draws)))
        pixels, times["crop + resize"] = _timed(lambda pb: T.resize_crop(T.hwc_as_chw(pb[0]), pb[1], image_size),
                                                decoded)
        collate = T.stack_uint8
    else:  # an earlier checkout: PIL decode in draft mode, one PIL crop + resize call
        decoded, times["decode"] = _timed(lambda r: I.load_rgb(r["jpg"], min_size=image_size), raws)
        pixels, times["crop + resize"] = _timed(lambda pd: T.train_transform(pd[0], image_size, pd[1]),
                                                list(zip(decoded, draws)))
        collate = T.stack_uint8
    tokenizer = get_tokenizer()
    captions = [r["txt"].decode() for r in raws]
    _, times["tokenise"] = _timed(tokenizer, _batches(captions, batch))
    _, times["collate"] = _timed(collate, _batches(pixels, batch))
    return {name: times[name] * 1000.0 / len(raws) for name in STAGES}


def _openclip_stages(spec: str, n: int, image_size: int, batch: int) -> dict[str, float]:
    """OpenCLIP's stages with its own pieces: open_clip_train's tar reader, webdataset's PIL decode ("pilrgb"),
    its training transform (crop + resize + to float + normalise), its tokenizer per sample, torch.stack."""
    import open_clip
    import webdataset as wds

    from alignclip.data.shards import expand_spec

    ocd = _openclip_wds_patch()
    start = time.process_time()
    next(ocd.tarfile_to_samples_nothrow(iter([{"url": expand_spec(spec)[0]}])), None)  # lazy imports, untimed
    raws = []
    for sample in ocd.tarfile_to_samples_nothrow(iter([{"url": url} for url in expand_spec(spec)])):
        raws.append(sample)
        if len(raws) == n:
            break
    read_s = time.process_time() - start
    decoder = wds.autodecode.Decoder([wds.autodecode.imagehandler("pilrgb")])
    decoded, decode_s = _timed(lambda r: decoder({"__key__": r["__key__"], "jpg": r["jpg"]})["jpg"], raws)
    preprocess = open_clip.image_transform(image_size, is_train=True)
    pixels, crop_s = _timed(preprocess, decoded)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    tokens, token_s = _timed(lambda r: tokenizer(r["txt"].decode())[0], raws)
    _, collate_s = _timed(lambda b: (torch.stack([p for p, _ in b]), torch.stack([t for _, t in b])),
                          _batches(list(zip(pixels, tokens)), batch))
    ms = 1000.0 / len(raws)
    return {"read": read_s * ms, "decode": decode_s * ms, "crop + resize": crop_s * ms, "tokenise": token_s * ms,
            "collate": collate_s * ms}


def _child(args: list[str], pythonpath: str = "") -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    result = subprocess.run([sys.executable, str(HERE), *args], capture_output=True, text=True, env=env,
                            timeout=3600)
    if result.returncode:
        return {"error": (result.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def case_in_subprocess(case: str, spec: str, workers: int, samples: int, batch: int, image_size: int,
                       pythonpath: str = "", decode: str = "cpu") -> dict:
    return _child(["--case", case, "--spec", spec, "--workers", str(workers), "--samples", str(samples),
                   "--batch-size", str(batch), "--image-size", str(image_size), "--decode", decode], pythonpath)


def stages_in_subprocess(case: str, spec: str, n: int, image_size: int, batch: int, pythonpath: str = "") -> dict:
    return _child(["--stages", case, "--spec", spec, "--samples", str(n), "--image-size", str(image_size),
                   "--batch-size", str(batch)], pythonpath)


# ------------------------------------------------------------------------------------------------- plan
def h100_samples_per_s(mfu: float = 0.40, config: str = "experiment/cc12m_alignclip") -> float:
    """The FLOP model's training rate of one H100 (bf16 peak) at ``mfu``: what the loader must feed per GPU."""
    from alignclip.config import load_config
    from alignclip.training.flops import step_flops
    from alignclip.training.peaks import PEAK_TFLOPS

    return mfu * PEAK_TFLOPS["H100"]["bf16"] * 1e12 / step_flops(load_config(config)).total


def workers_per_gpu(stage_ms: dict[str, float], gpu_rate: float) -> tuple[float, int]:
    """(samples/s of one worker on one core, workers a GPU needs at ``gpu_rate``) from the stages' CPU ms."""
    per_worker = 1000.0 / sum(stage_ms.values())
    return per_worker, math.ceil(gpu_rate / per_worker)


def extract_commit(commit: str, out: Path) -> str:
    """``alignclip/`` of ``commit`` (this checkout's git history) into ``out``, read-only; "" when not a checkout."""
    repo = HERE.parent.parent
    archive = subprocess.run(["git", "-C", str(repo), "archive", commit, "alignclip"], capture_output=True)
    if archive.returncode:
        return ""
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
    return str(out)


def median_stages(runs: list[dict]) -> dict:
    """Per stage, the median over runs (an error when any run failed)."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    return {name: float(np.median([r[name] for r in runs])) for name in STAGES}


def _print_stages(rows: dict[str, dict]) -> None:
    print(f"{'stage (CPU ms/sample, 1 thread)':34s}" + "".join(f"{case:>11s}" for case in rows))
    for name in (*STAGES, "total"):
        cells = "".join(f"{'failed':>11s}" if "error" in r else
                        f"{(sum(r[s] for s in STAGES) if name == 'total' else r[name]):11.3f}" for r in rows.values())
        print(f"  {name:32s}{cells}")
    for case, r in rows.items():
        if "error" in r:
            print(f"  {case}: {r['error']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--source-size", type=int, default=256, help="side of the stored JPEGs")
    parser.add_argument("--image-size", type=int, default=224, help="model input side (the crop)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--stage-samples", type=int, default=512, help="samples per stage breakdown")
    parser.add_argument("--stage-rounds", type=int, default=3, help="rounds of stage breakdowns (median)")
    parser.add_argument("--plan-sizes", nargs="*", default=list(PLAN_SIZES), choices=list(PLAN_SIZES),
                        help="stored image sizes of the plan table (none: no plan table)")
    parser.add_argument("--dir", default="", help="keep the shards here (default: a temporary folder)")
    parser.add_argument("--before-commit", default="c85906b",
                        help="an earlier commit of this checkout to measure as 'before' ('' for none)")
    parser.add_argument("--before-checkout", default="",
                        help="or a folder holding an earlier alignclip/ (put on PYTHONPATH)")
    parser.add_argument("--case", choices=("ours", "openclip"), help=argparse.SUPPRESS)  # one loader, JSON out
    parser.add_argument("--stages", help=argparse.SUPPRESS)  # one stage breakdown, JSON out
    parser.add_argument("--decode", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--spec", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args.case, args.spec, args.workers[0], args.samples, args.batch_size,
                                  args.image_size, args.decode)))
        return 0
    if args.stages:
        print(json.dumps(stage_breakdown(args.stages, args.spec, args.samples, args.image_size, args.batch_size)))
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.dir or tmp)
        out.mkdir(parents=True, exist_ok=True)
        before = args.before_checkout or (extract_commit(args.before_commit, Path(tmp) / "before")
                                          if args.before_commit else "")
        if args.before_commit and not before:
            print(f"(no 'before': git archive {args.before_commit} failed; not a git checkout?)")
        per_shard = args.samples // args.shards
        start = time.perf_counter()
        existing = [out / f"{i:05d}.tar" for i in range(args.shards)]
        reused = bool(args.dir) and all(p.exists() for p in existing)
        if reused:  # shards written by an earlier run
            mean_bytes = float(np.mean([len(r["jpg"]) for r in _raw_samples(str(existing[0]), 10**9)]))
        else:
            mean_bytes = write_bench_shards(out, args.shards, per_shard, args.source_size)
        spec = str(out / f"{{00000..{args.shards - 1:05d}}}.tar")
        total = per_shard * args.shards
        cores = os.cpu_count() or 1
        print(f"{total} samples of {args.source_size}-px JPEG (mean {mean_bytes / 1024:.1f} KiB) in {args.shards} "
              f"shards, {'reused' if reused else 'written'} in {time.perf_counter() - start:.1f} s; batch {args.batch_size}, crop to "
              f"{args.image_size}, {cores} CPU(s); load average {os.getloadavg()[0]:.2f}"
              + (f"; before = {args.before_checkout or args.before_commit}" if before else "") + "\n")

        # 1. stages, each pipeline with its own code; rounds of the cases one after the other, median per stage
        cases = [("ours", ""), ("ours gpu", "")] + ([("before", before)] if before else []) + [("openclip", "")]
        n = min(args.stage_samples, total)
        rounds = [{case: stages_in_subprocess("ours" if case == "before" else case, spec, n, args.image_size,
                                              args.batch_size, path) for case, path in cases}
                  for _ in range(args.stage_rounds)]
        stages = {case: median_stages([r[case] for r in rounds]) for case, _ in cases}
        print(f"(median of {args.stage_rounds} round(s), each running every case once, in this order)")
        _print_stages(stages)
        if "before" in stages and "error" not in stages["before"] and "error" not in stages["ours"]:
            ours_ms, before_ms = (sum(stages[c][s] for s in STAGES) for c in ("ours", "before"))
            print(f"  ours / before, total CPU per sample: {ours_ms / before_ms:.2f}x ({ours_ms:.3f} / "
                  f"{before_ms:.3f} ms); ours gpu / before: "
                  f"{sum(stages['ours gpu'][s] for s in STAGES) / before_ms:.2f}x")
        print(f"  load average after the stages: {os.getloadavg()[0]:.2f}\n")

        # 2. loaders with 0/1/2 workers
        loaders = [("ours", "", "cpu"), ("ours gpu", "", "gpu")] + \
            ([("before", before, "cpu")] if before else []) + [("openclip", "", "cpu")]
        print("workers  case        samples/s  epoch samples/s  first batch (s)  CPU ms/sample (normalise)  "
              "MB/batch moved  ours vs it (samples/s, CPU ms)")
        for workers in args.workers:
            results = {}
            for case, path, decode in loaders:
                results[case] = r = case_in_subprocess("openclip" if case == "openclip" else "ours", spec,
                                                       workers, total, args.batch_size, args.image_size, path,
                                                       decode)
                if "error" in r:
                    print(f"{workers:7d}  {case:10s}  failed: {r['error']}")
                    continue
                ours = results["ours"]
                ratio = (f"{ours['rate'] / r['rate']:.2f}x, {ours['cpu_ms'] / r['cpu_ms']:.2f}x"
                         if case not in ("ours", "ours gpu") and "rate" in ours else "")
                print(f"{workers:7d}  {case:10s}  {r['rate']:9.0f}  {r['epoch_rate']:15.0f}  {r['startup']:15.2f}  "
                      f"{r['cpu_ms']:13.2f} ({r['normalise_ms']:.2f})  {r['bytes'] / 2**20:14.2f}  {ratio}")
        print("\n(samples/s: between the first and the last batch; epoch samples/s: from building the loader to the "
              "last batch, start-up included (OpenCLIP fills a 1,000-sample shuffle buffer before its first batch); "
              "ours vs it: ours' samples/s over that case's, ours' CPU ms over that case's; (normalise): the part of the CPU "
              "ms spent normalising uint8 batches in the loop, on the device in training; every case in a fresh "
              f"process with OMP_NUM_THREADS=1, one after the other; load average now {os.getloadavg()[0]:.2f})\n")

        # 3. the plan table
        if args.plan_sizes:
            gpu_rate = h100_samples_per_s()
            print(f"plan: CPU ms/sample per stage (1 thread), samples/s per worker (one core each) and workers per "
                  f"GPU for the FLOP model's H100 rate, {gpu_rate:.0f} samples/s (ViT-B/16 AlignCLIP, 40 % MFU); "
                  f"crop {args.image_size}")
            print(f"{'stored images':14s} {'decode':6s} " + " ".join(f"{s:>13s}" for s in STAGES)
                  + f" {'total':>7s} {'/s/worker':>9s} {'workers/GPU':>11s}")
            for label in args.plan_sizes:
                width, height = PLAN_SIZES[label]
                folder = Path(tmp) / f"plan_{label}"
                folder.mkdir(exist_ok=True)
                plan_n = min(n, 256)
                write_bench_shards(folder, 1, plan_n, width, height)
                for case, decode in (("ours", "cpu"), ("ours gpu", "gpu")):
                    r = stages_in_subprocess(case, str(folder / "00000.tar"), plan_n, args.image_size,
                                             args.batch_size)
                    if "error" in r:
                        print(f"{label:14s} {decode:6s} failed: {r['error']}")
                        continue
                    per_worker, needed = workers_per_gpu(r, gpu_rate)
                    print(f"{label + f' ({width}x{height})':14s} {decode:6s} "
                          + " ".join(f"{r[s]:13.3f}" for s in STAGES)
                          + f" {sum(r.values()):7.3f} {per_worker:9.0f} {needed:11d}")
            print(f"(load average now {os.getloadavg()[0]:.2f}; gpu: the workers' share only, the device's is "
                  "tools/gpu_check.py's 'data decode gpu' row)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
