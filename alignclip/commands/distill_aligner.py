"""Distil MLP aligners (Vu, Balashova & Tran, "Closing the Gap of Latent Spaces for Image-Text Arithmetic",
VinUniversity 2024) from image to text embeddings and compare them with post-hoc baselines (mean
shift, mean-centring, centred Procrustes): gap AND task metrics on a held-out set for every method.

    alignclip-distill --fit exported/clip.safetensors --out reports/aligner_clip
        # fits on the generated train split, evaluates on the generated validation split
    alignclip-distill --fit cache/clip/train --eval cache/clip/val --out ...
    alignclip-distill --model local-dir:exported/clip_openclip --out ...   # any OpenCLIP / HF CLIP (--fit)
    --recipe NAME:cos=1,mse=0,clip=0.5,imsep=0.25 (repeatable) chooses the loss weights of each MLP.

A training run directory is refused unless --trust-checkpoint (exporting it unpickles DeepSpeed state).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from alignclip.errors import run_command

PROG = "alignclip-distill"
DEFAULT_RECIPES = ["mlp_cos:cos=1", "mlp_cos_clip_imsep:cos=1,clip=1,imsep=0.5"]
_WEIGHT_KEYS = {"cos": "cosine_weight", "mse": "mse_weight", "clip": "clip_weight", "imsep": "imsep_weight"}


def parse_recipe(text: str) -> tuple[str, dict]:
    name, _, body = text.partition(":")
    weights = {v: 0.0 for v in _WEIGHT_KEYS.values()}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        if key not in _WEIGHT_KEYS:
            raise ValueError(f"recipe {text!r}: unknown loss {key!r}; expected one of {sorted(_WEIGHT_KEYS)}")
        try:
            weights[_WEIGHT_KEYS[key]] = float(value)
        except ValueError:
            raise ValueError(f"recipe {text!r}: weight of {key!r} must be a number, found {value!r}") from None
    return name, weights


def main(argv: list[str] | None = None) -> int:
    from alignclip.aligner.baselines import BASELINES
    from alignclip.commands.sources import add_source_arguments
    from alignclip.embeddings import is_model

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fit", "--model", dest="fit", required=True,
                        help="set to fit on: a model (its --fit-split; our export, an OpenCLIP model or a Hugging "
                             "Face CLIP folder) or a cache")
    parser.add_argument("--eval", default="", help="held-out set (default: the same model's --eval-split)")
    parser.add_argument("--fit-split", default="train", choices=["train", "val"])
    parser.add_argument("--eval-split", default="val", choices=["train", "val"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--baselines", default="identity,mean_shift,mean_centering,procrustes",
                        help=f"comma-separated, from {sorted(BASELINES)}")
    parser.add_argument("--recipe", action="append", default=None, help="NAME:cos=..,mse=..,clip=..,imsep=..")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--no-residual", action="store_true", help="plain MLP instead of x + MLP(x)")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--train-batch-size", type=int, default=256)
    parser.add_argument("--max-epochs", type=int, default=200)
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--lam", type=float, default=1.0, help="arithmetic lambda")
    parser.add_argument("--seed", type=int, default=0)
    add_source_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.eval and not is_model(args.fit) and not (Path(args.fit) / "checkpoints").is_dir():
        parser.error("--fit is a cached set: pass a held-out --eval set (fitting and scoring on one set hides "
                     "overfitting)")
    try:
        recipes = [(r, *parse_recipe(r)) for r in args.recipe or DEFAULT_RECIPES]
    except ValueError as err:
        parser.error(str(err))
    return run_command(PROG, lambda: _run(args, recipes))


def _run(args, recipes) -> int:
    from alignclip.aligner.baselines import build_baseline
    from alignclip.aligner.compare import compare_methods, comparison_table, write_comparison
    from alignclip.aligner.mlp import AlignerShape, save_aligner
    from alignclip.aligner.train import AlignerTraining, train_aligner
    from alignclip.commands.sources import resolve_source

    fit_set = resolve_source(args.fit, args, split=args.fit_split)
    eval_set = resolve_source(args.eval or args.fit, args, split=args.eval_split)
    img, txt = fit_set.pairs()
    methods = {name: build_baseline(name).fit(img, txt) for name in filter(None, args.baselines.split(","))}
    out = Path(args.out)
    histories = {}
    for recipe, name, weights in recipes:
        settings = AlignerTraining(lr=args.lr, weight_decay=args.weight_decay, batch_size=args.train_batch_size,
                                   max_epochs=args.max_epochs, patience=args.patience,
                                   val_fraction=args.val_fraction, seed=args.seed, **weights)
        shape = AlignerShape(dim=img.shape[1], hidden=args.hidden, depth=args.depth, residual=not args.no_residual,
                             dropout=args.dropout)
        aligner, history = train_aligner(img, txt, shape, settings)
        save_aligner(aligner, out / f"{name}.safetensors", extra={"recipe": recipe, "fit": args.fit})
        methods[name] = aligner
        histories[name] = {"best_epoch": history.best_epoch, "epochs": len(history.val_loss),
                           "best_val_loss": min(history.val_loss), "stopped_early": history.stopped_early}
    # linear probes fit on the fitting set (a train split) and score on the held-out set
    rows = compare_methods(methods, eval_set, lam=args.lam, seed=args.seed, train_set=fit_set)
    notes = (f"Fitted on {args.fit} ({args.fit_split}, {len(img)} pairs); evaluated on "
             f"{args.eval or args.fit} ({args.eval_split}, {len(eval_set.text)} captions). MLP training: "
             + json.dumps(histories))
    report = write_comparison(rows, out, "Aligner distillation against post-hoc baselines", notes)
    print(comparison_table(rows))
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
