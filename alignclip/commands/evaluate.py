"""Evaluate a model the way CLIP_benchmark does (alignclip-eval, tools/evaluate.py): one CLIP_benchmark JSON per
dataset and task (its ``build`` command reads them), plus results.csv / results.md tables of every JSON in --out.

Standard datasets (--benchmark KIND --root DIR; alignclip.eval.datasets), encoded through a DataLoader:
    alignclip-eval --model exported/m.safetensors --benchmark imagefolder --root /data/imagenet/val --out results/
    alignclip-eval --model exported/m.safetensors --benchmark imagefolder --root /data/imagenet/val \
        --linear-probe --probe-root /data/imagenet/train --out ...
    alignclip-eval --model exported/m.safetensors --benchmark cifar10 --root /data/cifar --linear-probe --out ...
    alignclip-eval --model exported/m.safetensors --benchmark karpathy --root /data/flickr30k/images \
        --annotations /data/flickr30k/dataset_flickr30k.json --out ...
    alignclip-eval --model exported/m.safetensors --benchmark wds --root /data/wds_cifar10 --device cuda --out ...
    alignclip-eval --model local-dir:exported/m_openclip --benchmark wds --root ... --out ...  # any OpenCLIP / HF CLIP
The project's image-text sets (the generated set, shards, a captioned folder, caches): retrieval, zero-shot and
linear probes of its tasks, multimodal arithmetic:
    alignclip-eval --model exported/alignclip.safetensors --out results/alignclip
    alignclip-eval --model exported/clip.safetensors --aligner aligner/mlp_cos.safetensors --out ...
    alignclip-eval --model embeddings/x/val --probe-train embeddings/x/train --simat-relevance rel.npy --out ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from alignclip.errors import run_command

PROG = "alignclip-eval"


def main(argv: list[str] | None = None) -> int:
    from alignclip.commands.sources import add_source_arguments
    from alignclip.eval.datasets import KINDS

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="a model (exported .safetensors; OpenCLIP local-dir:DIR, hf-hub:ORG/NAME from the cache "
                             "or ARCH:TAG with cached weights; a Hugging Face CLIP folder), a cache directory or an "
                             "image .npy")
    parser.add_argument("--name", default="", help="model name in the JSONs (default: the file name)")
    parser.add_argument("--dataset", default="", help="dataset name in the JSONs (default: from the data)")
    parser.add_argument("--aligner", default="", help="an aligner .safetensors applied after the image encoder")
    parser.add_argument("--out", required=True, help="results folder")
    parser.add_argument("--device", default="cpu", help="torch device for encoding (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers decoding images")
    bench = parser.add_argument_group("standard datasets")
    bench.add_argument("--benchmark", choices=KINDS, default="", help="a standard dataset instead of --data")
    bench.add_argument("--root", default="", help="its folder (the image folder for karpathy)")
    bench.add_argument("--annotations", default="", help="karpathy: the Karpathy-split JSON")
    bench.add_argument("--benchmark-split", default="test", help="split to evaluate (test, val)")
    bench.add_argument("--linear-probe", action="store_true",
                       help="also fit a linear probe on the train split and score it on --benchmark-split "
                            "(classification datasets)")
    bench.add_argument("--probe-root", default="",
                       help="imagefolder: the folder of the probe's train images (one folder holds one split); "
                            "other kinds read their train split under --root")
    sets = parser.add_argument_group("the project's image-text sets")
    sets.add_argument("--probe-train", default="",
                      help="a set with the same tasks encoded from a train split: linear probes fit on it")
    sets.add_argument("--lam", type=float, default=1.0, help="lambda of image + lambda (text_b - text_a)")
    sets.add_argument("--seed", type=int, default=0, help="seed of the linear probes")
    sets.add_argument("--simat-relevance", default="",
                      help="SIMAT-style score: [queries, gallery] .npy of relevance for the cached arithmetic queries")
    add_source_arguments(parser)
    args = parser.parse_args(argv)
    if args.benchmark and not args.root:
        parser.error("--benchmark needs --root DIR")
    if args.probe_root and not args.linear_probe:
        parser.error("--probe-root is the linear probe's train folder: give --linear-probe too")
    if args.linear_probe and args.benchmark == "karpathy":
        parser.error("--linear-probe needs a classification dataset; karpathy is image-text retrieval")
    if args.linear_probe and args.benchmark == "imagefolder" and (
            not args.probe_root or Path(args.probe_root).resolve() == Path(args.root).resolve()):
        # an image folder is one split: its "train" split would be the evaluated images themselves
        parser.error("--linear-probe with imagefolder needs --probe-root DIR, a folder of train images other than "
                     "--root (a probe fitted on the images it is scored on measures nothing)")
    if args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    return run_command(PROG, lambda: _run(args))


def _model_name(args) -> str:
    from alignclip.interop import model_name

    return args.name or model_name(args.model) + (f"+{Path(args.aligner).stem}" if args.aligner else "")


def _run(args) -> int:
    from alignclip.eval.results import read_results, write_tables

    paths = _run_benchmark(args) if args.benchmark else _run_sets(args)
    print("\n".join(str(p) for p in paths))
    csv_path, md_path = write_tables(read_results([args.out]), args.out)
    print(f"tables: {csv_path} {md_path}")
    return 0


def _run_benchmark(args) -> list[Path]:
    import torch

    from alignclip.eval.benchmark import evaluate_benchmark
    from alignclip.eval.datasets import open_benchmark
    from alignclip.eval.results import write_result
    from alignclip.data.transforms import ImageTransform
    from alignclip.embeddings import is_model
    from alignclip.interop import open_model
    from alignclip.tokenizer import get_tokenizer

    if not is_model(args.model):
        raise ValueError(f"--benchmark needs a model (an exported .safetensors, an OpenCLIP model or a Hugging Face "
                         f"CLIP folder), got {args.model}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device {args.device!r} is not a torch device (cpu, cuda, cuda:N)") from None
    opened = open_model(args.model, device)
    model, config = opened.model, opened.config
    if args.aligner:
        from alignclip.aligner.mlp import AlignedModel, load_aligner

        model = AlignedModel(model, load_aligner(args.aligner).to(device)).eval()
    transform = ImageTransform(config.model.vision.image_size)
    data = open_benchmark(args.benchmark, args.root, args.benchmark_split, transform, args.annotations)
    train = open_benchmark(args.benchmark, args.probe_root or args.root, "train", transform, args.annotations) \
        if args.linear_probe else None
    results = evaluate_benchmark(model, get_tokenizer(config.model.text.context_length), data, str(device),
                                 args.batch_size, args.workers, train)
    dataset = args.dataset or (args.benchmark if args.benchmark != "wds" else f"wds/{Path(args.root).name}")
    print(json.dumps(results, indent=1))
    return [write_result(args.out, dataset, _model_name(args), task, metrics, pretrained=str(args.model))
            for task, metrics in results.items()]


def _run_sets(args) -> list[Path]:
    import numpy as np

    from alignclip.aligner.mlp import load_aligner
    from alignclip.commands.sources import resolve_source
    from alignclip.embeddings import EmbeddingSet
    from alignclip.eval.arithmetic import simat_score
    from alignclip.eval.results import write_result
    from alignclip.eval.suite import evaluate_set, write_results

    name = _model_name(args)
    es = resolve_source(args.model, args, name)
    train = EmbeddingSet.load(args.probe_train) if args.probe_train else None
    if args.aligner:
        aligner = load_aligner(args.aligner)
        es = es.mapped(aligner.map_image, aligner.map_text, name)
        train = train.mapped(aligner.map_image, aligner.map_text, name) if train is not None else None
    dataset = args.dataset or (args.data if not args.folder else Path(args.folder).name)
    results = evaluate_set(es, lam=args.lam, seed=args.seed, train=train)
    # what the figures rest on, in every result: the pairs measured, and those the shards' reading left out, by
    # reason ("unknown" for a source that does not count them)
    counts = {"images_measured": len(es.image), "captions_measured": len(es.text),
              "pairs_skipped": es.meta.get("pairs_skipped", "unknown")}
    paths = write_results(results, args.out, dataset, name, pretrained=str(args.model), lam=args.lam, **counts)
    if args.simat_relevance:
        if es.arithmetic is None:
            raise ValueError("--simat-relevance needs arithmetic queries (a tasks JSON with 'arithmetic')")
        ar = es.arithmetic
        score = simat_score(es.image, ar.source, ar.text_a, ar.text_b,
                            np.load(args.simat_relevance, allow_pickle=False), lam=args.lam)
        paths.append(write_result(args.out, dataset, name, "simat", {"simat_score": score},
                                  pretrained=str(args.model), lam=args.lam))
    print(json.dumps(results, indent=1))
    return paths


if __name__ == "__main__":
    raise SystemExit(main())
