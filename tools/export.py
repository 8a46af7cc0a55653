"""Export a training checkpoint to one safetensors file (+ its config), loadable with alignclip.load.

    python tools/export.py runs/NAME exported/NAME.safetensors          # the run's latest checkpoint
    python tools/export.py runs/NAME/checkpoints/step_00001000 out.safetensors
"""

import argparse
import logging

from alignclip.export import export_checkpoint


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="run directory, its checkpoints/ directory, or a step_XXXXXXXX directory")
    parser.add_argument("out", help="output .safetensors path (a .yaml sidecar with the config is written next to it)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(export_checkpoint(args.checkpoint, args.out))


if __name__ == "__main__":
    main()
