"""Write or check webdataset shards in img2dataset's layout (KEY.jpg, KEY.txt, KEY.json; NNNNN_stats.json).

    # (a) a folder of images and a captions file (CSV / TSV with a header, or JSONL; columns image + caption;
    #     --no-header: a CSV / TSV of image,caption rows without one). Samples are keyed 000000000, 000000001, ...
    #     as img2dataset does; sources.tsv beside the shards maps each key to its image's name in the captions file
    alignclip-make-shards folder --images photos/ --captions captions.csv --out shards/ --samples-per-shard 1000

    # (b) the built-in generated dataset (train shards, or the validation split with --split val)
    alignclip-make-shards generated --out gen/ --num-shards 8 --samples-per-shard 512 --image-size 64

    # check existing shards (e.g. img2dataset's CC12M output): counts, unreadable images, empty captions, damage
    alignclip-make-shards validate "cc12m/{00000..01242}.tar"

(``python tools/make_shards.py ...`` is the same command.) Images are decoded by ``alignclip.data.images``: over
``--max-image-pixels`` an image is skipped, counted and named; a captions file may start with a UTF-8 BOM.
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

from alignclip.errors import run_command

PROG = "alignclip-make-shards"


def _folder(args) -> int:
    from alignclip.data.writer import check_manifest, read_captions_file, write_folder_shards

    pairs = read_captions_file(args.captions, header=not args.no_header)
    capacity = args.num_shards * args.samples_per_shard
    if args.num_shards and capacity < len(pairs):
        dropped = len(pairs) - capacity
        if not args.drop_extra:
            raise ValueError(f"--num-shards {args.num_shards} x --samples-per-shard {args.samples_per_shard} = "
                             f"{capacity} samples, but {args.captions} has {len(pairs)} pairs: {dropped} would be "
                             f"left out; raise either, or pass --drop-extra to keep the first {capacity}")
        print(f"warning: --drop-extra: leaving out the last {dropped} of {len(pairs)} pairs", file=sys.stderr)
    manifest = {"source": "folder", "images": str(Path(args.images).resolve()),
                "captions": str(Path(args.captions).resolve()), "pairs": len(pairs),
                "samples_per_shard": args.samples_per_shard, "num_shards": args.num_shards,
                "max_image_pixels": args.max_image_pixels, **({"header": False} if args.no_header else {})}
    rewrite = check_manifest(args.out, manifest, args.overwrite)
    summary = write_folder_shards(pairs, args.images, args.out, args.samples_per_shard, args.num_shards, rewrite,
                                  max_pixels=args.max_image_pixels)
    print(f"{len(pairs)} pairs -> {args.out}: wrote {summary.written_shards} shard(s) with {summary.samples} samples "
          f"({summary.failed} unreadable images and {summary.too_large} over {args.max_image_pixels:,} pixels left "
          f"out); kept {summary.kept_shards} finished shard(s)")
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
                  + (f", {r.undecodable_caption} caption(s) not UTF-8" if r.undecodable_caption else "")
                  + (f", {r.damaged}" if r.damaged else "")
                  + (f", stats.json says {r.stats_count}" if r.stats_count not in (None, r.samples) else "")
                  + (f"; e.g. {r.bad_keys[:3]}" if r.bad_keys else ""))
    print(json.dumps(totals, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps({"totals": totals, "shards": [report_dict(r) for r in reports]},
                                              indent=1))
    return 0 if all(r.ok for r in reports) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    folder = sub.add_parser("folder", help="images + captions file -> shards")
    folder.add_argument("--images", required=True, help="folder the captions file's image paths are relative to")
    folder.add_argument("--captions", required=True, help="CSV, TSV or JSONL with image and caption columns")
    folder.add_argument("--no-header", action="store_true",
                        help="the CSV/TSV has no header row: first column the image, second the caption")
    folder.add_argument("--out", required=True)
    folder.add_argument("--samples-per-shard", type=int, default=10_000)
    folder.add_argument("--num-shards", type=int, default=0, help="0: as many as the pairs fill")
    folder.add_argument("--drop-extra", action="store_true",
                        help="with --num-shards too small for the pairs, keep the first ones (else an error)")
    folder.add_argument("--max-image-pixels", type=int, default=100_000_000,
                        help="skip (count and name) larger images; 0: no limit (default %(default)s)")
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
    command = {"folder": _folder, "generated": _generated, "validate": _validate}[args.command]
    return run_command(PROG, lambda: command(args))


if __name__ == "__main__":
    raise SystemExit(main())
