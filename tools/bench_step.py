"""Benchmark steady-state training steps: samples/s, MFU, peak memory, time split (tools/benchmarks/step_bench.py).

    python tools/bench_step.py --config configs/model/alignclip_tiny.yaml --batch 64
    python tools/bench_step.py --config configs/model/alignclip_vit_b16.yaml --batch 4 --steps 3
    python tools/bench_step.py --config configs/model/alignclip_vit_b16.yaml --batch 256     # on a GPU: bf16,
                                                                                          # fused AdamW, compile
    python tools/bench_step.py --config configs/model/alignclip_tiny.yaml --batch 64 \\
        --variant "no compile: fast_path.compile=false" --variant "bf16: fast_path.precision=bf16" --rounds 3

Positional ``key=value`` overrides apply to every case; each ``--variant "LABEL: key=value ..."`` adds a row with
its own overrides on top (the first row is the base). ``--data`` includes the data path (the real loader of
``data.train``, "generated" by default); without it the inputs are made on the device once.
"""

from __future__ import annotations

import argparse
import sys



def main(argv=None) -> None:
    from benchmarks.step_bench import BenchCase, format_table, run_isolated

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/model/alignclip_tiny.yaml", help="YAML or a name under configs/")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for every case")
    parser.add_argument("--batch", type=int, default=32, help="samples per step on the one device")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator)")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--data", action="store_true", help="include the data path (loader + host-to-device copy)")
    parser.add_argument("--variant", action="append", default=[], metavar="'LABEL: key=value ...'",
                        help="an extra row with these overrides on top of the base (repeatable)")
    parser.add_argument("--base-label", default="", help="label of the base row (default: the config's name)")
    parser.add_argument("--rounds", type=int, default=1, help="alternate the cases this many times; median round")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="device peak for MFU (default: the table)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    args = parser.parse_args(argv)

    common = dict(config=args.config, batch=args.batch, steps=args.steps, warmup=args.warmup, device=args.device,
                  with_data=args.data, peak_tflops=args.peak_tflops, threads=args.threads)
    cases = [BenchCase(overrides=list(args.overrides), label=args.base_label, **common)]
    for spec in args.variant:
        label, _, rest = spec.partition(":")
        cases.append(BenchCase(overrides=[*args.overrides, *rest.split()], label=label.strip(), **common))
    progress = lambda r: print(f"  ... {r.label}: {1e3 * r.step_s:.1f} ms/step", file=sys.stderr, flush=True)  # noqa
    results = run_isolated(cases, rounds=args.rounds, progress=progress)
    first = results[0]
    print(f"training step, {args.config}, device {first.device}, median of {args.steps} steps after {args.warmup} "
          f"warm-up{'' if args.rounds == 1 else f', median of {args.rounds} rounds'}; "
          f"{'with the data path' if args.data else 'synthetic inputs on the device'}")
    for r in results:
        print(f"  {r.label}: {r.fast_path}")
    print("GFLOP/sample: model FLOPs of a training step (alignclip.training.flops); MFU blank without a known peak")
    print(format_table(results))


if __name__ == "__main__":
    main()
