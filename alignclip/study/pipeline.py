"""The whole study in one call: train the grid, measure every finished run and post-hoc map, aggregate, draw the
sweeps' curves and the trade-off, report."""

from __future__ import annotations

import time
from typing import Callable, Optional

from alignclip.study.curves import plot_curves, read_scalars
from alignclip.study.report import aggregate, write_report
from alignclip.study.runner import embeddings_of, is_done, measure_posthoc, measure_run, train_grid
from alignclip.study.spec import StudySpec


def run_study(spec: StudySpec, executor: Optional[str] = None, log: Callable[[str], None] = print,
              train: bool = True) -> dict:
    """Train (skipping finished runs), measure (post-hoc maps fitted on their source runs), and write
    ``study_report.md``, ``study_results.json`` and the plots into the study folder; returns the results dict."""
    from alignclip.study.measure import gap_plots

    started = time.perf_counter()
    states = train_grid(spec, log, executor, train)
    measurements: dict = {}
    for state in states:
        if not is_done(state.run_dir):
            continue
        measurements.setdefault(state.variant, {})[state.seed] = measure_run(spec, state.run_dir, state.seed)
    for variant in spec.variants:
        if variant.posthoc is None:
            continue
        for seed in spec.seeds:
            measured = measure_posthoc(spec, variant, seed)
            if measured is not None:
                measurements.setdefault(variant.name, {})[seed] = measured
    variants = [v.name for v in spec.variants if v.name in measurements]
    measurements = {v: measurements[v] for v in variants}
    out = spec.study_dir
    plots: dict[str, str] = {}
    plot_seed = spec.seeds[0]
    for eval_set in spec.eval_sets:
        sets = {v: embeddings_of(spec, spec.variant(v), plot_seed, eval_set.name) for v in variants
                if plot_seed in measurements[v]}
        if sets:
            folder = gap_plots(sets, out / "plots" / eval_set.name, title=f"{spec.name}: {eval_set.name}")
            plots[f"Paired-cosine CDF, {eval_set.name} (seed {plot_seed})"] = \
                (folder / "cosine_cdf.png").relative_to(out).as_posix()
            plots[f"PCA projection, {eval_set.name} (seed {plot_seed})"] = \
                (folder / "pca_projection.png").relative_to(out).as_posix()
    trained = [v for v in variants if spec.variant(v).trains]
    curves = {v: {s: read_scalars(spec.run_dir(v, s)) for s in measurements[v]} for v in trained}
    if curves:
        (out / "plots").mkdir(parents=True, exist_ok=True)
        plot_curves(curves, out / "plots" / "training_curves.png")
        plots["Training curves: loss and live alignment over seeds"] = "plots/training_curves.png"
    counts = {status: sum(s.status == status for s in states)
              for status in ("skipped", "trained", "failed", "pending")}
    aggregated = aggregate(measurements, spec.baseline) if spec.baseline in measurements else {}
    results = {
        "study": spec.name, "source": spec.source, "variants": variants, "baseline": spec.baseline,
        "seeds": list(spec.seeds), "eval_sets": [e.name for e in spec.eval_sets],
        "kinds": {v: describe_variant(spec.variant(v)) for v in variants},
        "runs": [dict(variant=s.variant, seed=s.seed, run_dir=str(s.run_dir), status=s.status, detail=s.detail)
                 for s in states],
        "runs_summary": f"{counts['trained']} trained, {counts['skipped']} finished before, {counts['failed']} failed"
                        + (f", {counts['pending']} not trained (--no-train)" if counts["pending"] else ""),
        "measurements": {v: {str(s): m for s, m in seeds.items()} for v, seeds in measurements.items()},
        "aggregate": aggregated,
        "curves": {v: {str(s): c for s, c in seeds.items()} for v, seeds in curves.items()},
    }
    results["sweeps"], results["tradeoff"] = sweeps_and_tradeoff(spec, aggregated, variants, out, plots)
    results["wall_time_s"] = time.perf_counter() - started
    md, js = write_report(out, results, plots)
    log(f"study {spec.name}: {results['runs_summary']}; report {md}; results {js}")
    return results


def describe_variant(variant) -> str:
    if variant.posthoc:
        return f"post-hoc {variant.posthoc.map} on {variant.posthoc.source}, fitted on {variant.posthoc.fit}"
    if variant.finetune:
        return f"fine-tune of {variant.finetune.source} for {variant.finetune.steps} steps"
    return "pretraining"


def sweeps_and_tradeoff(spec: StudySpec, aggregated: dict, variants: list[str], out, plots: dict) -> tuple[dict, dict]:
    """Per eval set: each sweep's curves (and trends), the trade-off points and the Pareto-best variants; the
    plots go to ``out/plots`` and are listed in ``plots``."""
    from alignclip.study.report import GAP_COLUMNS, metric_label
    from alignclip.study.tradeoff import (default_downstream, pareto_best, plot_sweep, plot_tradeoff, sweep_curve,
                                         sweep_trends, tradeoff_lines)

    sweeps_out, tradeoff_out = {}, {}
    for eval_set, agg in aggregated.items():
        values = agg["values"]
        downstream = [m for m in (spec.tradeoff.downstream or default_downstream(values)) if m in values]
        gap = spec.tradeoff.gap
        if gap not in values:
            continue
        gap_metrics = [f"gap/{k}" for _, k in GAP_COLUMNS if f"gap/{k}" in values]
        curve_metrics = [gap, *[m for m in gap_metrics if m != gap][:1], *downstream]
        for sweep in spec.sweeps:
            if not any(p.variant in variants for p in sweep.points):
                continue
            entry = {"base": sweep.base, "keys": list(sweep.keys),
                     "curves": {m: sweep_curve(values, m, sweep) for m in gap_metrics + downstream}}
            if sweep.trend:
                entry["trends"] = sweep_trends(values, sweep, gap_metrics + downstream, sweep.extrapolate)
            path = out / "plots" / eval_set / f"sweep_{sweep.name}.png"
            plot_sweep(values, sweep, [(metric_label(m), m) for m in curve_metrics], path,
                       baseline=spec.baseline)
            plots[f"Sweep {sweep.name} of {sweep.base}, {eval_set}: curves with 95 % bands"] = \
                path.relative_to(out).as_posix()
            sweeps_out.setdefault(eval_set, {})[sweep.name] = entry
        if not downstream:
            continue
        lines = tradeoff_lines(variants, spec.sweeps)
        path = out / "plots" / eval_set / "tradeoff.png"
        plot_tradeoff(values, (metric_label(gap), gap), [(metric_label(m), m) for m in downstream], lines, path)
        plots[f"Trade-off, {eval_set}: {metric_label(gap)} vs downstream"] = path.relative_to(out).as_posix()
        # a scale axis spends another budget: its points are drawn, but Pareto compares one budget's settings
        rescaled = {p.variant for sweep in spec.sweeps if sweep.trend for p in sweep.points if p.variant != sweep.base}
        same_budget = [v for v in variants if v not in rescaled]
        tradeoff_out[eval_set] = {"gap": gap, "downstream": downstream,
                                  "lines": [[name, points] for name, points in lines],
                                  "pareto": {m: pareto_best(values, gap, m, same_budget) for m in downstream},
                                  "pareto_excludes": sorted(rescaled & set(variants))}
    return sweeps_out, tradeoff_out
