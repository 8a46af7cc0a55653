"""Submit a hyper-parameter sweep (a grid or an explicit list of points) as one Slurm job array via submitit.

    alignclip-sweep --config configs/experiment/cc12m_alignclip.yaml \\
        --grid optim.lr=1e-3,5e-4 --grid loss.imsep_weight=0.5,1.0  'data.train=/data/cc12m/{00000..01242}.tar'
    alignclip-sweep --config ... --point "optim.lr=1e-3 optim.warmup_steps=2000" --point "optim.lr=5e-4"
    alignclip-sweep --config ... --grid optim.lr=1e-3,5e-4 --executor local --wait   # no Slurm needed

Trailing ``key=value`` arguments apply to every point. Each point trains in ``<run dir>/<point name>`` (stable, so
re-running the same command resumes every point from its checkpoints); ``<run dir>/sweep.json`` lists the points,
their run directories and job ids. Executor settings come from the config's ``launch`` section.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from alignclip.errors import ConfigError, run_command
from alignclip.launch import grid, make_sweep, parse_axis, submit_sweep, wait_slurm

PROG = "alignclip-sweep"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config", "-c", required=True, help="YAML file or a name under configs/")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                        help="one axis of a grid (repeat for more axes)")
    parser.add_argument("--point", action="append", default=[], metavar='"K=V K2=V2"',
                        help="one explicit point (repeat); not combined with --grid")
    parser.add_argument("--executor", choices=("slurm", "local"), default=None, help="default: launch.executor")
    parser.add_argument("--sweep-dir", default=None, help="default: the base config's run dir")
    parser.add_argument("--dry-run", action="store_true", help="print the points and run dirs, submit nothing")
    parser.add_argument("--wait", action="store_true", help="block until every point has finished")
    parser.add_argument("--timeout-s", type=float, default=7 * 24 * 3600, help="with --wait")
    parser.add_argument("overrides", nargs="*", help="key=value applied to every point")
    args = parser.parse_args(argv)
    return run_command(PROG, lambda: _run(args))


def _run(args) -> int:
    if bool(args.grid) == bool(args.point):
        raise ConfigError("give either --grid axes or --point entries (one of the two)")
    points = grid(dict(parse_axis(a) for a in args.grid)) if args.grid else [shlex.split(p) for p in args.point]
    if args.dry_run:
        root, runs = make_sweep(args.config, points, args.overrides, args.sweep_dir)
        for run in runs:
            print(f"{run.run_dir}\t{' '.join(run.overrides)}")
        return 0
    submitted = submit_sweep(args.config, points, args.overrides, args.executor, args.sweep_dir)
    for s in submitted:
        print(f"job {s.job_id}\t{s.run.run_dir}")
    if args.wait:
        if submitted and type(submitted[0].job).__module__.startswith("submitit.slurm"):
            wait_slurm([s.job_id for s in submitted], args.timeout_s)  # works without sacct
        else:
            failures = 0
            for s in submitted:
                try:
                    s.job.results()  # one result per task
                except Exception as err:  # report every failed point, not only the first
                    failures += 1
                    print(f"point {s.run.run_dir} failed: {err}", file=sys.stderr)
            return 1 if failures else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
