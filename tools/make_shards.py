"""Write or check webdataset shards in img2dataset's layout (KEY.jpg, KEY.txt, KEY.json; NNNNN_stats.json).

    # (a) a folder of images and a captions file (CSV / TSV with a header, or JSONL; columns image + caption)
    python tools/make_shards.py folder --images photos/ --captions captions.csv --out shards/ --samples-per-shard 1000

    # (b) the built-in generated dataset (train shards, or the validation split with --split val)
    python tools/make_shards.py generated --out gen/ --num-shards 8 --samples-per-shard 512 --image-size 64

    # check existing shards (e.g. img2dataset's CC12M output): counts, unreadable images, empty captions, damage
    python tools/make_shards.py validate "cc12m/{00000..01242}.tar"

Writing is resumable: shards appear atomically, and a rerun with the same arguments keeps the finished ones.
An output folder written with other arguments (or by something else) is refused unless --overwrite.
Exit codes: 0 fine, 1 validation found problems, 2 bad arguments or refused output folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing


def _folder(args) -> int:
    from alignclip.data.writer import check_manifest, read_captions_file, write_folder_shards

    pairs = read_captions_file(args.captions)
    manifest = {"source": "folder", "images": str(Path(args.images).resolve()),
                "captions": str(Path(args.captions).resolve()), "pairs": len(pairs),
                "samples_per_shard": args.samples_per_shard, "num_shards": args.num_shards}
    rewrite = check_manifest(args.out, manifest, args.overwrite)
    summary = write_folder_shards(pairs, args.images, args.out, args.samples_per_shard, args.num_shards, rewrite)
    print(f"{len(pairs)} pairs -> {args.out}: wrote {summary.written_shards} shard(s) with {summary.samples} samples "
          f"({summary.failed} unreadable images left out); kept {summary.kept_shards} finished shard(s)")
    return 0


def _generated(args) -> int:
    from alignclip.data import generated
    from alignclip.data.writer import check_manifest

    manifest = {"source": "generated", "generator_version": generated.GENERATOR_VERSION, "split": args.split,
                "num_shards": args.num_shards, "samples_per_shard": args.samples_per_shard,
                "image_size": args.image_size, "seed": args.seed}
    rewrite = check_manifest(args.out, manifest, args.overwrite)
    out = Path(args.out)
    if rewrite:
        for old in out.glob(f"{args.split}-*.tar"):
            old.unlink()
    kept = sum((out / f"{args.split}-{i:05d}.tar").exists() for i in range(args.num_shards))
    start = time.perf_counter()
    truth = generated.write_split(out, args.split, args.num_shards, args.samples_per_shard, args.image_size,
                                  args.seed)
    (out / f"{args.split}_labels.json").write_text(json.dumps(
        {"zero_shot": generated.zero_shot_tasks(), **truth}, indent=1))
    total = args.num_shards * args.samples_per_shard
    print(f"generated {args.split}: {args.num_shards} shard(s) x {args.samples_per_shard} = {total} samples in "
          f"{out} ({kept} shard(s) kept, {time.perf_counter() - start:.1f} s)")
    return 0


def _validate(args) -> int:
    from alignclip.data.shards import expand_spec
    from alignclip.data.validate import report_dict, validate_shards

    reports, totals = validate_shards(expand_spec(args.spec))
    for r in reports:
        if args.verbose or not r.ok:
            status = "ok" if r.ok else "PROBLEM"
            print(f"{status:8s} {r.shard}: {r.samples} samples, {r.usable} usable, {r.corrupt_image} corrupt, "
                  f"{r.missing_image} no image, {r.empty_caption} empty caption"
                  + (f", {r.damaged}" if r.damaged else "")
                  + (f", stats.json says {r.stats_count}" if r.stats_count not in (None, r.samples) else "")
                  + (f"; e.g. {r.bad_keys[:3]}" if r.bad_keys else ""))
    print(json.dumps(totals, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps({"totals": totals, "shards": [report_dict(r) for r in reports]},
                                              indent=1))
    return 0 if all(r.ok for r in reports) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    folder = sub.add_parser("folder", help="images + captions file -> shards")
    folder.add_argument("--images", required=True, help="folder the captions file's image paths are relative to")
    folder.add_argument("--captions", required=True, help="CSV, TSV or JSONL with image and caption columns")
    folder.add_argument("--out", required=True)
    folder.add_argument("--samples-per-shard", type=int, default=10_000)
    folder.add_argument("--num-shards", type=int, default=0, help="0: as many as the pairs fill")
    folder.add_argument("--overwrite", action="store_true")
    gen = sub.add_parser("generated", help="the built-in procedural dataset -> shards")
    gen.add_argument("--out", required=True)
    gen.add_argument("--split", choices=("train", "val"), default="train")
    gen.add_argument("--num-shards", type=int, default=8)
    gen.add_argument("--samples-per-shard", type=int, default=512)
    gen.add_argument("--image-size", type=int, default=64)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--overwrite", action="store_true")
    val = sub.add_parser("validate", help="check existing shards")
    val.add_argument("spec", help="brace pattern, folder, or several joined with '::'")
    val.add_argument("--json", default="", help="also write the per-shard report here")
    val.add_argument("--verbose", "-v", action="store_true", help="list every shard, not only the bad ones")
    args = parser.parse_args(argv)
    for name in ("samples_per_shard", "num_shards", "image_size"):
        if getattr(args, name, 1) < (0 if name == "num_shards" and args.command == "folder" else 1):
            parser.error(f"--{name.replace('_', '-')} must be positive")
    try:
        return {"folder": _folder, "generated": _generated, "validate": _validate}[args.command](args)
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
