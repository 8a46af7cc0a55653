"""Aggregate a study's measurements over seeds and write ``study_report.md``, ``study_results.json`` and plots.

Layout follows Eslami & de Melo (2025, arXiv:2406.17639): Table 1's gap metrics (alignment, L2M, RMG, linear
separability, uniformity), then the downstream tables (zero-shot top-1 beside the mean per-class recall, with the
set's majority-class rate and the pairs and images measured; retrieval R@1/5, linear probe), each as
mean ± standard deviation over seeds per variant, and for every metric each variant's difference to the baseline
with a 95 % t-interval over seeds, paired by seed (alignclip.study.stats). A per-seed table of the headline
metrics follows, since with few seeds a mean ± std hides a seed that failed outright. Sweeps get a table of their
curves (mean and 95 % interval per swept value), the trade-off its Pareto-best variants.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

from alignclip.study.stats import paired_difference, summarize

# Table 1 of the paper: (column, metric key in the measurement's "gap" section, higher is better?)
GAP_COLUMNS = [("alignment", "alignment_score"), ("L2M", "centroid_distance"), ("RMG", "rmg_l2"),
               ("lin. separability", "linear_separability"), ("uniformity", "uniformity")]


def flatten(measurement: Mapping) -> dict[str, float]:
    """One eval set's {"gap", "tasks", "counts"} as metric id -> value: "gap/<key>", "<task>/<metric>",
    "counts/<key>" (numbers only: a metric field that is not one is left out)."""
    flat = {f"gap/{k}": float(v) for k, v in measurement["gap"].items() if _number(v)}
    for task, metrics in measurement["tasks"].items():
        for name, value in metrics.items():
            if _number(value):
                flat[f"{task}/{name}"] = float(value)
    for name, value in measurement.get("counts", {}).items():
        flat[f"counts/{name}"] = float(value)
    return flat


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


PER_CLASS = "mean_per_class_recall"


def metric_label(metric: str) -> str:
    """A metric id as a column header: "zeroshot_shape/acc1" -> "zero-shot shape top-1"."""
    for column, key in GAP_COLUMNS:
        if metric == f"gap/{key}":
            return column
    task, _, name = metric.partition("/")
    retrieval = {f"{key}_recall@{k}": f"{direction} R@{k}" for direction, key in
                 (("I→T", "text_retrieval"), ("T→I", "image_retrieval")) for k in (1, 5, 10)}
    if task == "retrieval" and name in retrieval:
        return retrieval[name]
    for prefix, what in (("zeroshot_", "zero-shot"), ("linear_probe_", "probe")):
        if task.startswith(prefix):
            kind = {"acc1": "top-1", "acc5": "top-5", PER_CLASS: "per-class recall"}.get(name, name)
            return f"{what} {task[len(prefix):]} {kind}"
    return metric


def downstream_columns(metric_ids) -> list[tuple[str, str]]:
    """(column, metric id) of the downstream tables present: zero-shot top-1, retrieval R@1/5, linear probe."""
    ids = set(metric_ids)
    cols = []
    for mid in sorted(ids):
        task, _, name = mid.partition("/")
        if task.startswith("zeroshot_") and name == "acc1":
            cols.append((f"zero-shot {task[9:]} top-1", mid))
            if f"{task}/{PER_CLASS}" in ids:
                cols.append((f"zero-shot {task[9:]} per-class recall", f"{task}/{PER_CLASS}"))
    for direction, key in (("I→T", "text_retrieval"), ("T→I", "image_retrieval")):
        for k in (1, 5):
            if f"retrieval/{key}_recall@{k}" in ids:
                cols.append((f"{direction} R@{k}", f"retrieval/{key}_recall@{k}"))
    for mid in sorted(ids):
        task, _, name = mid.partition("/")
        if task.startswith("linear_probe_") and name == "acc1":
            cols.append((f"probe {task[13:]} top-1", mid))
    return cols


def aggregate(measurements: Mapping[str, Mapping[int, Mapping[str, Mapping]]], baseline: str) -> dict:
    """measurements: variant -> seed -> eval set -> {"gap", "tasks"}. Returns per eval set:
    {"values": metric -> variant -> {seed: value}, "summary": metric -> variant -> {mean, std, n},
     "difference": metric -> variant -> {mean, low, high, excludes_zero, n} (variant - baseline, paired)}."""
    out: dict = {}
    eval_sets = sorted({name for seeds in measurements.values() for per in seeds.values() for name in per})
    for eval_set in eval_sets:
        values: dict[str, dict[str, dict[int, float]]] = {}
        for variant, seeds in measurements.items():
            for seed, per_set in seeds.items():
                if eval_set not in per_set:
                    continue
                for mid, value in flatten(per_set[eval_set]).items():
                    values.setdefault(mid, {}).setdefault(variant, {})[int(seed)] = value
        summary = {mid: {v: vars(summarize([s[k] for k in sorted(s)])) for v, s in per.items()}
                   for mid, per in values.items()}
        difference = {}
        for mid, per in values.items():
            if baseline not in per:
                continue
            difference[mid] = {}
            for variant, seeds in per.items():
                if variant == baseline or not set(seeds) & set(per[baseline]):
                    continue
                d = paired_difference(seeds, per[baseline])
                difference[mid][variant] = dict(mean=d.mean, low=d.low, high=d.high, n=d.n,
                                                excludes_zero=d.excludes_zero, text=d.text())
        out[eval_set] = {"values": values, "summary": summary, "difference": difference}
    return out


def _cell(summary: dict) -> str:
    if summary["n"] < 2:
        return f"{summary['mean']:.3f}"
    return f"{summary['mean']:.3f} ± {summary['std']:.3f}"


def per_seed_columns(gap_cols: list[tuple[str, str]], down_cols: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The headline metrics for the per-seed table: alignment, L2M, separability, zero-shot top-1, I→T R@1."""
    keep = {"gap/alignment_score", "gap/centroid_distance", "gap/linear_separability",
            "retrieval/text_retrieval_recall@1"}
    return [(c, mid) for c, mid in gap_cols + down_cols if mid in keep or (c.startswith("zero-shot") and
                                                                          c.endswith("top-1"))]


def _table(rows: list[str], columns: list[tuple[str, str]], cell) -> str:
    lines = ["| variant | " + " | ".join(c for c, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row in rows:
        lines.append(f"| {row} | " + " | ".join(cell(row, mid) for _, mid in columns) + " |")
    return "\n".join(lines)


def markdown(results: dict, plots: Mapping[str, str]) -> str:
    """The report's text (plots given as name -> path relative to the report)."""
    variants, baseline, seeds = results["variants"], results["baseline"], results["seeds"]
    kinds = results.get("kinds", {})
    derived = [f"{v} ({kinds[v]})" for v in variants if kinds.get(v, "pretraining") != "pretraining"]
    parts = [f"# Study {results['study']}", "",
             f"Variants: {', '.join(variants)}; seeds {seeds} (paired across variants); baseline {baseline}. "
             f"Runs: {results['runs_summary']}. Wall time of this command: {results['wall_time_s']:.0f} s.", "",
             "Cells are mean ± sample standard deviation over seeds (one seed: the value). Differences are "
             f"variant − {baseline} per seed, averaged, with a 95 % Student-t interval on n − 1 degrees of freedom "
             "(n/a with one seed); * marks an interval that excludes zero. Gap metrics follow Eslami & de Melo "
             "(2025, arXiv:2406.17639) Table 1: alignment = mean paired cosine (higher: smaller gap), L2M = "
             "distance between the modality centroids, RMG = relative modality gap (Schrodi et al. 2025, "
             "arXiv:2404.07983), linear separability of image vs text embeddings (0.5: the modalities overlap), "
             "uniformity = mean of both modalities' log-potential (lower: more uniform).", ""]
    if derived:
        parts += ["Derived variants: " + "; ".join(derived) + ". A post-hoc variant's seed k is its map fitted on "
                  "its source's seed-k run, so it pairs with the baseline like a trained variant.", ""]
    for eval_set, agg in results["aggregate"].items():
        summary, difference = agg["summary"], agg["difference"]
        gap_cols = [(c, f"gap/{k}") for c, k in GAP_COLUMNS if f"gap/{k}" in summary]
        down_cols = downstream_columns(summary)

        def cell(row, mid, summary=summary):
            return _cell(summary[mid][row]) if row in summary.get(mid, {}) else "–"

        def diff_cell(row, mid, difference=difference):
            return difference.get(mid, {}).get(row, {}).get("text", "–")

        def seed_cell(row, mid, values=agg["values"]):
            per = {int(seed): v for seed, v in values.get(mid, {}).get(row, {}).items()}  # JSON keys are str
            return " / ".join(f"{per[seed]:.3f}" if seed in per else "–" for seed in seeds)

        others = [v for v in variants if v != baseline]
        parts += [f"## Evaluation set `{eval_set}`", ""]
        counted = counts_line(agg["values"])
        if counted:
            parts += [counted, ""]
        parts += ["### Modality gap (Table 1 layout)", "",
                  _table(variants, gap_cols, cell), "", "### Downstream", "", _table(variants, down_cols, cell), ""]
        if others:
            parts += [f"### Difference to {baseline} (95 % interval over seeds, paired)", "",
                      _table(others, gap_cols, diff_cell), "", _table(others, down_cols, diff_cell), ""]
        if len(seeds) > 1:
            parts += [f"### Per seed ({', '.join(map(str, seeds))})", "",
                      _table(variants, per_seed_columns(gap_cols, down_cols), seed_cell), ""]
    for eval_set, sweeps in results.get("sweeps", {}).items():
        for name, sweep in sweeps.items():
            parts += sweep_section(eval_set, name, sweep)
    for eval_set, trade in results.get("tradeoff", {}).items():
        parts += [f"## Trade-off on `{eval_set}`: {metric_label(trade['gap'])} against downstream", "",
                  "Pareto-best (no other variant has both a smaller gap and a better figure, means over seeds):", ""]
        parts += [f"- {metric_label(m)}: {', '.join(best) or '–'}" for m, best in trade["pareto"].items()]
        if trade.get("pareto_excludes"):
            parts += ["", f"(Left out of the comparison, being at another budget: the scale axis' points "
                          f"{', '.join(trade['pareto_excludes'])}.)"]
        parts.append("")
    if plots:
        parts += ["## Plots", ""]
        for caption, rel in plots.items():
            parts += [f"### {caption}", "", f"![{caption}]({rel})", ""]
    failed = [r for r in results["runs"] if r["status"] == "failed"]
    if failed:
        parts += ["## Failed runs (not in the tables; rerun the command to resubmit them)", ""]
        parts += [f"- {r['variant']} seed {r['seed']}: {r['detail']}" for r in failed]
    return "\n".join(parts) + "\n"


def metric_range(metric: str) -> tuple[float, float]:
    """The values a metric can take (cosines in [-1, 1], centroid distances of unit vectors in [0, 2], rates and
    recalls in [0, 1]; uniformity and unknown metrics unbounded)."""
    inf = float("inf")
    bounds = {"gap/alignment_score": (-1.0, 1.0), "gap/centroid_distance": (0.0, 2.0), "gap/uniformity": (-inf, 0.0)}
    if metric in bounds:
        return bounds[metric]
    name = metric.partition("/")[2]
    if metric.startswith("gap/linear_separability") or name.startswith(("acc", "mean_per_class", "text_retrieval",
                                                                          "image_retrieval", "arithmetic")):
        return 0.0, 1.0
    return -inf, inf


def counts_line(values: Mapping) -> str:
    """What the figures rest on: pairs and images measured, and per zero-shot task the labelled images and the
    majority-class rate (the top-1 of always answering the most frequent class)."""
    def first(metric):
        per_variant = values.get(metric, {})
        for seeds in per_variant.values():
            for value in seeds.values():
                return value
        return None

    pairs, images = first("counts/pairs"), first("counts/images")
    if pairs is None:
        return ""
    text = f"Measured on {int(pairs)} image-caption pairs of {int(images)} images."
    tasks = sorted(m[len("counts/"):-len("/majority_rate")] for m in values
                   if m.startswith("counts/") and m.endswith("/majority_rate"))
    for task in tasks:
        text += (f" {task.replace('zeroshot_', 'Zero-shot ')}: {int(first(f'counts/{task}/labelled'))} labelled "
                 f"images, majority-class rate {first(f'counts/{task}/majority_rate'):.3f}.")
    return text


def _interval_cell(row: dict) -> str:
    if row["low"] is None:
        return f"{row['mean']:.3f}"
    return f"{row['mean']:.3f} [{row['low']:.3f}, {row['high']:.3f}]"


def sweep_section(eval_set: str, name: str, sweep: dict) -> list[str]:
    """A sweep's curves as a table: one row per swept value, mean [95 % interval] over seeds per metric."""
    metrics = list(sweep["curves"])
    by_label: dict[str, dict] = {}
    for metric, rows in sweep["curves"].items():
        for row in rows:
            by_label.setdefault(row["label"], {"variant": row["variant"], "n": row["n"]})[metric] = row
    keys = ", ".join(sweep["keys"])
    lines = [f"## Sweep `{name}` of {sweep['base']} on `{eval_set}` ({keys})", "",
             "Mean over seeds [95 % t-interval of the mean].", "",
             f"| {keys} | variant | seeds | " + " | ".join(metric_label(m) for m in metrics) + " |",
             "|---" * (len(metrics) + 3) + "|"]
    for label, row in by_label.items():
        cells = [_interval_cell(row[m]) if m in row else "–" for m in metrics]
        lines.append(f"| {label} | {row['variant']} | {row['n']} | " + " | ".join(cells) + " |")
    lines.append("")
    for metric, trend in sweep.get("trends", {}).items():
        line = (f"- {metric_label(metric)}: {trend['slope']:+.3f} per decade of {sweep['keys'][0]} "
                f"[{trend['slope_low']:+.3f}, {trend['slope_high']:+.3f}] ({trend['n']} points)")
        if trend.get("predicted") is not None:
            line += (f"; at {trend['x_new']:g}: {trend['predicted']:.3f} [{trend['predicted_low']:.3f}, "
                     f"{trend['predicted_high']:.3f}] (an extrapolation: valid only if the trend stays log-linear")
            low, high = metric_range(metric)
            outside = trend["predicted"] < low or trend["predicted"] > high
            line += f"; outside the metric's range [{low:g}, {high:g}]: it cannot)" if outside else ")"
        lines.append(line)
    if sweep.get("trends"):
        lines.append("")
    return lines


def write_report(out_dir: str | Path, results: dict, plots: Mapping[str, str]) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "study_results.json"
    json_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    md_path = out / "study_report.md"
    md_path.write_text(markdown(results, plots))
    return md_path, json_path
