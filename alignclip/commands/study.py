"""alignclip-study: train a grid of variants x seeds the same way, measure each the same way, report with error
bars (study_report.md, study_results.json, plots in the study folder). docs/study.md.

    alignclip-study configs/study/embedded.yaml                       # local executor, one run after another
    alignclip-study configs/study/cc12m_paper.yaml 'data.train=/data/cc12m/{00000..01242}.tar'   # Slurm array (quoted: bash expands braces)
    alignclip-study STUDY --executor local --seeds 0,1 key=value ...  # override executor, seeds, run keys

A rerun of the same command skips finished runs, resumes unfinished ones from their checkpoints and reuses
every measurement already made.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Optional

from alignclip.errors import ConfigError, run_command

PROG = "alignclip-study"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("study", help="a study file (configs/study/*.yaml, or a name under configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides applied to every run")
    parser.add_argument("--executor", choices=["local", "slurm"], default=None, help="instead of the file's")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds, instead of the file's")
    parser.add_argument("--output-dir", default=None, help="where the study folder goes, instead of the file's")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the options
    return run_command(PROG, lambda: _run(args))


def _run(args) -> int:
    # here, not at the top: --help and a wrong study file answer before torch and the trainer load
    from alignclip.study.pipeline import run_study
    from alignclip.study.spec import load_study

    spec = load_study(args.study, args.overrides)
    if args.seeds is not None:
        try:
            seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
        except ValueError:
            raise ConfigError(f"--seeds {args.seeds!r}: expected comma-separated integers") from None
        if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
            raise ConfigError(f"--seeds {args.seeds!r}: expected distinct integers >= 0")
        spec = replace(spec, seeds=seeds)
    if args.output_dir is not None:
        spec = replace(spec, output_dir=Path(args.output_dir))
    results = run_study(spec, executor=args.executor)
    return 1 if any(r["status"] == "failed" for r in results["runs"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
