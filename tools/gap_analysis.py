"""Gap analysis of one or several models side by side: JSON of figures, PNG plots, a Markdown report.

    python tools/gap_analysis.py --model clip=exported/clip.safetensors --model alignclip=exported/alignclip.safetensors \
        --out reports/gap                       # encodes the generated validation set with each model
    python tools/gap_analysis.py --model other=embeddings/other_clip/ --out reports/gap   # cached or foreign .npy
    ... --aligner clip=reports/aligner_clip/mlp_cos.safetensors    # adds a "clip+mlp_cos" column
"""

import argparse
from pathlib import Path

from alignclip.aligner.mlp import load_aligner
from alignclip.analysis.gap import analyse_gap
from alignclip.embeddings import add_source_arguments, resolve_source


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, metavar="NAME=SOURCE",
                        help="SOURCE: exported .safetensors, an embedding cache directory, or an image .npy")
    parser.add_argument("--aligner", action="append", default=[], metavar="NAME=ALIGNER",
                        help="also analyse model NAME's images mapped by a distilled aligner (.safetensors)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="seed of the separability split and of the plots")
    add_source_arguments(parser)
    args = parser.parse_args(argv)
    pairs = {}
    for item in args.model:
        name, _, source = item.partition("=")
        if not source:
            parser.error(f"--model expects NAME=SOURCE, found {item!r}")
        pairs[name] = resolve_source(source, args, name).pairs()
    for item in args.aligner:
        name, _, path = item.partition("=")
        if name not in pairs or not path:
            parser.error(f"--aligner expects NAME=PATH with NAME one of {sorted(pairs)}, found {item!r}")
        img, txt = pairs[name]
        pairs[f"{name}+{Path(path).stem}"] = (load_aligner(path).map_image(img), txt)
    figures = analyse_gap(pairs, args.out, seed=args.seed)
    for name, f in figures.items():
        print(f"{name}: alignment {f['alignment_score']:.4f}  L2M {f['centroid_distance']:.4f}  "
              f"RMG(cos) {f['rmg_cosine']:.4f}  separability {f['linear_separability']:.3f}")
    print(f"report: {args.out}/gap_report.md")


if __name__ == "__main__":
    main()
