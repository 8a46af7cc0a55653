"""Export a training checkpoint for use elsewhere (alignclip-export, tools/export.py).

    alignclip-export runs/NAME exported/NAME.safetensors                       # ours: alignclip.load(...)
    alignclip-export runs/NAME exported/NAME_openclip --format openclip        # open_clip "local-dir:..."
    alignclip-export runs/NAME exported/NAME_hf --format hf                    # transformers CLIPModel / CLIPProcessor
    alignclip-export runs/NAME/checkpoints/step_00001000 out.safetensors      # one checkpoint

An existing output is refused unless --force. The checkpoint is DeepSpeed's, which torch unpickles: export only
checkpoints you (or someone you trust) wrote.
The exported files are safetensors and JSON, which load without unpickling.
"""

from __future__ import annotations

import argparse
import logging

from alignclip.errors import run_command

PROG = "alignclip-export"


def main(argv: list[str] | None = None) -> int:
    from alignclip.export import FORMATS

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="run directory, its checkpoints/ directory, or a step_XXXXXXXX directory")
    parser.add_argument("out", help="safetensors: the output file (a .yaml sidecar holds the config); "
                                    "openclip / hf: the output folder")
    parser.add_argument("--format", default="safetensors", choices=FORMATS, help="default: %(default)s")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing output (an export folder is removed first); without it an "
                             "existing output is an error")
    parser.add_argument("--allow-inexact", action="store_true",
                        help="export a model saved before model.norm_eps (mixed LayerNorm eps) to openclip/hf "
                             "with eps 1e-5: its embeddings then differ by ~1e-3")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    def body():
        from alignclip.export import export_checkpoint

        print(export_checkpoint(args.checkpoint, args.out, format=args.format, allow_inexact=args.allow_inexact,
                                overwrite=args.force))

    return run_command(PROG, body)


if __name__ == "__main__":
    raise SystemExit(main())
