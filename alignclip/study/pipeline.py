"""The whole study in one call: train the grid, measure every finished run, aggregate, plot, report."""

from __future__ import annotations

import time
from typing import Callable, Optional

from alignclip.study.curves import plot_curves, read_scalars
from alignclip.study.report import aggregate, write_report
from alignclip.study.runner import embeddings_of, is_done, measure_run, train_grid
from alignclip.study.spec import StudySpec


def run_study(spec: StudySpec, executor: Optional[str] = None, log: Callable[[str], None] = print) -> dict:
    """Train (skipping finished runs), measure, and write ``study_report.md``, ``study_results.json`` and the
    plots into the study folder; returns the results dict."""
    from alignclip.study.measure import gap_plots

    started = time.perf_counter()
    states = train_grid(spec, log, executor)
    measurements: dict = {}
    for state in states:
        if not is_done(state.run_dir):
            continue
        measurements.setdefault(state.variant, {})[state.seed] = measure_run(spec, state.run_dir, state.seed)
    variants = [v.name for v in spec.variants if v.name in measurements]
    measurements = {v: measurements[v] for v in variants}
    out = spec.study_dir
    plots: dict[str, str] = {}
    plot_seed = spec.seeds[0]
    for eval_set in spec.eval_sets:
        sets = {v: embeddings_of(spec.run_dir(v, plot_seed), eval_set.name) for v in variants
                if plot_seed in measurements[v]}
        if sets:
            folder = gap_plots(sets, out / "plots" / eval_set.name, title=f"{spec.name}: {eval_set.name}")
            plots[f"Paired-cosine CDF, {eval_set.name} (seed {plot_seed})"] = \
                (folder / "cosine_cdf.png").relative_to(out).as_posix()
            plots[f"PCA projection, {eval_set.name} (seed {plot_seed})"] = \
                (folder / "pca_projection.png").relative_to(out).as_posix()
    curves = {v: {s: read_scalars(spec.run_dir(v, s)) for s in measurements[v]} for v in variants}
    if curves:
        (out / "plots").mkdir(parents=True, exist_ok=True)
        plot_curves(curves, out / "plots" / "training_curves.png")
        plots["Training curves: loss and live alignment over seeds"] = "plots/training_curves.png"
    counts = {status: sum(s.status == status for s in states) for status in ("skipped", "trained", "failed")}
    results = {
        "study": spec.name, "source": spec.source, "variants": variants, "baseline": spec.baseline,
        "seeds": list(spec.seeds), "eval_sets": [e.name for e in spec.eval_sets],
        "runs": [dict(variant=s.variant, seed=s.seed, run_dir=str(s.run_dir), status=s.status, detail=s.detail)
                 for s in states],
        "runs_summary": f"{counts['trained']} trained, {counts['skipped']} finished before, {counts['failed']} failed",
        "measurements": {v: {str(s): m for s, m in seeds.items()} for v, seeds in measurements.items()},
        "aggregate": aggregate(measurements, spec.baseline) if spec.baseline in measurements else {},
        "curves": {v: {str(s): c for s, c in seeds.items()} for v, seeds in curves.items()},
        "wall_time_s": time.perf_counter() - started,
    }
    md, js = write_report(out, results, plots)
    log(f"study {spec.name}: {results['runs_summary']}; report {md}; results {js}")
    return results
