"""Evaluate a model (or cached embeddings): retrieval R@1/5/10 both ways, zero-shot top-1/top-5/mean per-class
recall with template ensembles, linear probe, multimodal arithmetic; one CLIP_benchmark-style JSON per task.

    python tools/evaluate.py --model exported/alignclip.safetensors --out results/alignclip
    python tools/evaluate.py --model exported/clip.safetensors --aligner aligner/mlp_cos.safetensors --out ...
    python tools/evaluate.py --model embeddings/x/val --simat-relevance simat_relevance.npy --out ...
"""

import argparse
import json
from pathlib import Path

import numpy as np

from alignclip.aligner.mlp import load_aligner
from alignclip.embeddings import add_source_arguments, resolve_source
from alignclip.eval.arithmetic import simat_score
from alignclip.eval.results import write_result
from alignclip.eval.suite import evaluate_set, write_results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="exported .safetensors, a cache directory or an image .npy")
    parser.add_argument("--name", default="", help="model name in the JSONs (default: the file name)")
    parser.add_argument("--dataset", default="", help="dataset name in the JSONs (default: --data)")
    parser.add_argument("--aligner", default="", help="an aligner .safetensors applied after the image encoder")
    parser.add_argument("--lam", type=float, default=1.0, help="lambda of image + lambda (text_b - text_a)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the linear-probe split")
    parser.add_argument("--simat-relevance", default="",
                        help="SIMAT-style score: [queries, gallery] .npy of relevance for the cached arithmetic queries")
    parser.add_argument("--out", required=True)
    add_source_arguments(parser)
    args = parser.parse_args(argv)
    name = args.name or Path(args.model).stem + (f"+{Path(args.aligner).stem}" if args.aligner else "")
    es = resolve_source(args.model, args, name)
    if args.aligner:
        aligner = load_aligner(args.aligner)
        es = es.mapped(aligner.map_image, aligner.map_text, name)
    dataset = args.dataset or (args.data if not args.folder else Path(args.folder).name)
    results = evaluate_set(es, lam=args.lam, seed=args.seed)
    paths = write_results(results, args.out, dataset, name, lam=args.lam)
    if args.simat_relevance:
        if es.arithmetic is None:
            parser.error("--simat-relevance needs arithmetic queries (a tasks JSON with 'arithmetic')")
        ar = es.arithmetic
        score = simat_score(es.image, ar.source, ar.text_a, ar.text_b, np.load(args.simat_relevance), lam=args.lam)
        paths.append(write_result(args.out, dataset, name, "simat", {"simat_score": score}, lam=args.lam))
    print(json.dumps(results, indent=1))
    print("\n".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
