"""Race our trainer against OpenCLIP's on the same small ViT-CLIP on CPU: samples/s of each and their ratio.

    python tools/bench_openclip_race.py                        # the race model, batch 64, 5 repeats x 4 steps
    python tools/bench_openclip_race.py --model clip_tiny --batch 32
    python tools/bench_openclip_race.py --override deepspeed.zero_stage=0   # vary OUR side only
    python tools/bench_openclip_race.py --full-last-block    # our trunks' last blocks at every row, as OpenCLIP
    python tools/bench_openclip_race.py --profile              # per-op tables of both sides instead of the race

Both sides start from the same weights and train on the same inputs with the same math (tools/benchmarks/openclip_race.py
says how); they alternate step by step in one process, so changing machine load falls on both alike. The table
prints each repeat's samples/s, the ratio ours / OpenCLIP (above 1: we are faster) and both losses, then the
medians.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None,
                        help="an arch=clip model config (clip_tiny, model/clip_vit_b16_openclip, a path); "
                             "default: the race model of tools/benchmarks/openclip_race.py")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per side and repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side before the first repeat")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--grad-clip", type=float, default=1.0, help="both sides (0: no clipping)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for OUR side (not model.* or loss.*), repeatable")
    parser.add_argument("--full-last-block", action="store_true",
                        help="our side: each trunk's last block at every row, as OpenCLIP computes it (the trainer, "
                             "and the race by default, run it at the pooled row only: model.pooled_last_block)")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler per-op tables instead")
    parser.add_argument("--profile-rows", type=int, default=25)
    args = parser.parse_args(argv)

    from alignclip.config import ConfigError
    from benchmarks import openclip_race as race

    try:
        if args.profile:
            tables = race.profile_sides(args.model, args.batch, steps=args.steps, warmup_steps=args.warmup,
                                        threads=args.threads, grad_clip=args.grad_clip,
                                        overrides=tuple(args.override), pooled_last_block=False if args.full_last_block else None,
                                        row_limit=args.profile_rows)
            for name, table in tables.items():
                print(f"===== {name}: {args.steps} steps, batch {args.batch}, {args.threads} threads")
                print(table)
            return
        race.race_config(args.model, args.batch, overrides=tuple(args.override))  # config errors before any work
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        raise SystemExit(2) from None

    def start(result) -> None:
        print(race.format_header(result.config, result.threads, args.steps, args.warmup, args.repeats))
        print(race.TABLE_HEADER)
        print("-" * len(race.TABLE_HEADER), flush=True)

    result = race.run_race(args.model, args.batch, steps=args.steps, repeats=args.repeats, warmup_steps=args.warmup,
                           threads=args.threads, grad_clip=args.grad_clip, overrides=tuple(args.override),
                           pooled_last_block=False if args.full_last_block else None, on_start=start, on_row=lambda row: print(race.format_row(row), flush=True))
    print(race.format_summary(result))
    print(f"parameters: {result.parameters:,} on each side")


if __name__ == "__main__":
    main()
