"""alignclip-study: train a grid of variants x seeds the same way, measure each the same way, report with error
bars (study_report.md, study_results.json, plots in the study folder). docs/study.md.

    alignclip-study configs/study/embedded.yaml                       # local executor, one run after another
    alignclip-study configs/study/cc12m_paper.yaml 'data.train=/data/cc12m/{00000..01242}.tar'   # Slurm array (quoted: bash expands braces)
    alignclip-study STUDY --executor local --seeds 0,1 key=value ...  # override executor, seeds, run keys
    alignclip-study configs/study/cc12m_paper.yaml --plan             # runs x GPU-hours; submits nothing
    alignclip-study STUDY --no-train                                  # report the runs finished so far

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
    parser.add_argument("--no-train", action="store_true",
                        help="submit nothing: measure and report the runs that have finished")
    parser.add_argument("--plan", action="store_true",
                        help="print runs x GPU-hours from the FLOP model (the file's plan: MFU, nodes, GPU) and stop")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the options
    return run_command(PROG, lambda: _run(args))


def _run(args) -> int:
    # here, not at the top: --help and a wrong study file answer before torch and the trainer load
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
    if args.plan or ((args.executor or spec.executor) == "slurm" and not args.no_train):
        print(plan_text(spec, required=args.plan), flush=True)
        if args.plan:
            return 0
    from alignclip.study.pipeline import run_study

    # a ConfigError found while preparing the data (e.g. caption embeddings that cannot be made) is one line, exit 2
    results = run_study(spec, executor=args.executor, train=not args.no_train)
    return 1 if any(r["status"] == "failed" for r in results["runs"]) else 0


def plan_text(spec, required: bool = True) -> str:
    """The cost plan for the study's epoch size: the file's plan.samples, else data.samples_per_epoch, else the
    generated data's size, else the count in the shards' metadata (sizes.json / *_stats.json). Unknown: a ConfigError when ``required`` (--plan),
    else a one-line hint (before a Slurm submission, which must not wait for the shards to be counted)."""
    from alignclip.study.plan import plan_table

    samples = spec.plan.samples
    if not samples:
        import tempfile
        from pathlib import Path

        from alignclip.config import load_config
        from alignclip.data.shards import expand_spec, metadata_count
        from alignclip.study.spec import run_overrides, write_variant_config

        variant = next(v for v in spec.variants if v.trains)
        with tempfile.TemporaryDirectory() as scratch:
            config = load_config(write_variant_config(spec, variant, Path(scratch)),
                                 run_overrides(spec, variant, 0))
        samples = config.data.samples_per_epoch
        if not samples and config.data.train == "generated":
            samples = config.data.generated.num_shards * config.data.generated.samples_per_shard
        if not samples and config.data.train and config.data.train != "generated":
            samples = metadata_count(expand_spec(config.data.train)) or 0
        if not samples:
            message = ("the plan needs the epoch size: set plan.samples in the study file, data.samples_per_epoch, "
                       "or data.train to shards with sizes.json / *_stats.json")
            if required:
                raise ConfigError(message)
            return f"cost plan: {message}"
    return plan_table(spec, samples)

if __name__ == "__main__":
    raise SystemExit(main())
