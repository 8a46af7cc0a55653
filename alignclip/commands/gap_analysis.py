"""Gap analysis of one or several models side by side: JSON of figures, PNG plots, a Markdown report
(alignclip-gap, tools/gap_analysis.py).

    alignclip-gap --model clip=exported/clip.safetensors --model alignclip=exported/alignclip.safetensors \
        --out reports/gap                       # encodes the generated validation set with each model
    alignclip-gap --model other=embeddings/other_clip/ --out reports/gap   # cached or foreign .npy
    alignclip-gap --model oc=local-dir:exported/clip_openclip --model hf=exported/clip_hf --out reports/gap
        # an OpenCLIP model (local-dir: / hf-hub: folder, cached ARCH:TAG) or a Hugging Face CLIP folder
    ... --aligner clip=reports/aligner_clip/mlp_cos.safetensors    # adds a "clip+mlp_cos" column

gap_metrics.json records each model's data source and pair count; models measured on different data are
refused unless --allow-mixed-data. A training run directory is refused unless --trust-checkpoint (it is
exported first, which unpickles DeepSpeed state).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from alignclip.errors import run_command

PROG = "alignclip-gap"


def main(argv: list[str] | None = None) -> int:
    from alignclip.commands.sources import add_source_arguments

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, metavar="NAME=SOURCE",
                        help="SOURCE: exported .safetensors, an embedding cache directory, or an image .npy")
    parser.add_argument("--aligner", action="append", default=[], metavar="NAME=ALIGNER",
                        help="also analyse model NAME's images mapped by a distilled aligner (.safetensors)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="seed of the separability split and of the plots")
    parser.add_argument("--allow-mixed-data", action="store_true",
                        help="put models measured on different data (source or pair count) side by side")
    add_source_arguments(parser)
    args = parser.parse_args(argv)
    models = []
    for item in args.model:
        name, _, source = item.partition("=")
        if not name or not source:
            parser.error(f"--model expects NAME=SOURCE, found {item!r}")
        models.append((name, source))
    aligners = []
    for item in args.aligner:
        name, _, path = item.partition("=")
        if name not in dict(models) or not path:
            parser.error(f"--aligner expects NAME=PATH with NAME one of {sorted(dict(models))}, found {item!r}")
        aligners.append((name, path))
    return run_command(PROG, lambda: _run(args, models, aligners))


def _run(args, models, aligners) -> int:
    from alignclip.aligner.mlp import load_aligner
    from alignclip.analysis.gap import analyse_gap, check_same_data
    from alignclip.commands.sources import resolve_source

    pairs, sources, skipped = {}, {}, {}
    for name, source in models:
        es = resolve_source(source, args, name)
        pairs[name] = es.pairs()
        sources[name] = str(es.meta.get("source", source))
        if isinstance(es.meta.get("pairs_skipped"), dict):  # measured from shards (a cache keeps it)
            skipped[name] = es.meta["pairs_skipped"]
    if not args.allow_mixed_data:
        check_same_data(sources, {name: len(p[0]) for name, p in pairs.items()})
    for name, path in aligners:
        img, txt = pairs[name]
        mapped = f"{name}+{Path(path).stem}"
        pairs[mapped], sources[mapped] = (load_aligner(path).map_image(img), txt), sources[name]
        if name in skipped:
            skipped[mapped] = skipped[name]
    figures = analyse_gap(pairs, args.out, seed=args.seed, sources=sources, skipped=skipped)
    for name, f in figures.items():
        print(f"{name}: alignment {f['alignment_score']:.4f}  L2M {f['centroid_distance']:.4f}  "
              f"RMG(cos) {f['rmg_cosine']:.4f}  separability {f['linear_separability']:.3f}")
    print(f"report: {args.out}/gap_report.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
