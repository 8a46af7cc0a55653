"""Sweeps as curves and the gap-vs-downstream trade-off: what closing the gap costs, method by method.

* ``sweep_curve``: per swept value, the mean over seeds with its 95 % t-interval (alignclip.study.stats);
* ``tradeoff_points``: every variant as (gap metric, downstream metric) means with their intervals, grouped into
  lines (one per sweep, its points labelled by the swept value; every other variant alone);
* ``pareto_best``: the variants no other variant beats on both axes (a smaller gap AND a better downstream
  figure), the settings worth running at scale;
* the two plots; ``sweep_trends``: a sweep over data or steps (``trend: true``) as y = a + b log10(x) per metric.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from alignclip.study.stats import log_trend, mean_interval

# +1: a higher value means a smaller modality gap; -1: a lower one does (Eslami & de Melo 2025, Table 1)
GAP_DIRECTION = {"gap/alignment_score": 1, "gap/centroid_distance": -1, "gap/rmg_l2": -1, "gap/rmg_cosine": -1,
                 "gap/linear_separability": -1, "gap/uniformity": -1}


def _seed_values(values: Mapping, metric: str, variant: str) -> list[float]:
    per = values.get(metric, {}).get(variant, {})
    return [per[k] for k in sorted(per, key=int)]


def interval(values: Mapping, metric: str, variant: str) -> tuple[float, float | None, float | None] | None:
    seeds = _seed_values(values, metric, variant)
    return mean_interval(seeds) if seeds else None


def default_downstream(metrics) -> list[str]:
    """I->T R@1 and each zero-shot task's mean per-class recall (top-1 rewards the majority guess when classes are
    unbalanced), as present."""
    ids = set(metrics)
    out = [m for m in ("retrieval/text_retrieval_recall@1",) if m in ids]
    out += sorted(m for m in ids if m.startswith("zeroshot_") and m.endswith("/mean_per_class_recall"))
    return out


def sweep_curve(values: Mapping, metric: str, sweep) -> list[dict]:
    """[{label, x, variant, mean, low, high, n}] in the sweep's order (x: the first key's value)."""
    rows = []
    for point in sweep.points:
        seeds = _seed_values(values, metric, point.variant)
        if not seeds:
            continue
        mean, low, high = mean_interval(seeds)
        rows.append(dict(label=sweep.label(point), x=point.values[0], values=list(point.values),
                         variant=point.variant, mean=mean, low=low, high=high, n=len(seeds)))
    return rows


def tradeoff_lines(variants: Sequence[str], sweeps: Sequence) -> list[tuple[str, list[tuple[str, str]]]]:
    """[(line name, [(variant, point label)])]: one line per sweep, then each variant in no sweep on its own."""
    lines, swept = [], set()
    for sweep in sweeps:
        points = [(p.variant, f"{sweep.name}={sweep.label(p)}") for p in sweep.points if p.variant in variants]
        swept |= {v for v, _ in points}
        if points:
            lines.append((f"{sweep.base}: {sweep.name}", points))
    lines += [(v, [(v, v)]) for v in variants if v not in swept]
    return lines


def pareto_best(values: Mapping, gap_metric: str, downstream: str, variants: Sequence[str]) -> list[str]:
    """Variants not dominated on (gap closed, downstream): no other variant is at least as good on both and
    better on one (means over seeds)."""
    sign = GAP_DIRECTION.get(gap_metric, 1)
    points = {}
    for v in variants:
        g, d = interval(values, gap_metric, v), interval(values, downstream, v)
        if g is not None and d is not None:
            points[v] = (sign * g[0], d[0])
    best = []
    for v, (g, d) in points.items():
        if not any(g2 >= g and d2 >= d and (g2 > g or d2 > d) for w, (g2, d2) in points.items() if w != v):
            best.append(v)
    return best


def sweep_trends(values: Mapping, sweep, metrics: Sequence[str], x_new: float | None = None) -> dict:
    """metric -> Trend fields (y on log10 of the sweep's first key, every seed a point) for a ``trend`` sweep."""
    out = {}
    for metric in metrics:
        xs, ys = [], []
        for point in sweep.points:
            for y in _seed_values(values, metric, point.variant):
                xs.append(float(point.values[0]))
                ys.append(y)
        try:
            out[metric] = vars(log_trend(xs, ys, x_new))
        except ValueError:
            continue
    return out


def _axes(n: int, width: float = 4.8, height: float = 3.8):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n, figsize=(width * n, height), squeeze=False)
    return plt, fig, axes[0]


def _save(plt, fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def plot_sweep(values: Mapping, sweep, metrics: Sequence[tuple[str, str]], path: str | Path,
               baseline: str | None = None) -> Path:
    """One panel per (label, metric): the sweep's mean over seeds with its 95 % band, one line per value of the
    second key (two-key sweeps); the baseline variant's mean and band as a horizontal reference."""
    plt, fig, axes = _axes(len(metrics))
    for ax, (label, metric) in zip(axes, metrics):
        rows = sweep_curve(values, metric, sweep)
        groups: dict[str, list[dict]] = {}
        for row in rows:
            groups.setdefault(", ".join(str(v) for v in row["values"][1:]), []).append(row)
        for group, members in groups.items():
            xs = [float(r["x"]) for r in members]
            ax.plot(xs, [r["mean"] for r in members], "o-", lw=2,
                    label=f"{sweep.keys[1]}={group}" if group else sweep.base)
            banded = [r for r in members if r["low"] is not None]
            if banded:
                ax.fill_between([float(r["x"]) for r in banded], [r["low"] for r in banded],
                                [r["high"] for r in banded], alpha=0.2)
        ref = interval(values, metric, baseline) if baseline else None
        if ref is not None:
            ax.axhline(ref[0], color="grey", ls="--", lw=1, label=f"{baseline}")
            if ref[1] is not None:
                ax.axhspan(ref[1], ref[2], color="grey", alpha=0.12)
        ax.set(xlabel=sweep.keys[0], ylabel=label, title=label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"sweep {sweep.name} of {sweep.base}: mean over seeds, 95 % band")
    return _save(plt, fig, Path(path))


def plot_tradeoff(values: Mapping, gap: tuple[str, str], downstream: Sequence[tuple[str, str]],
                  lines: Sequence[tuple[str, list[tuple[str, str]]]], path: str | Path) -> Path:
    """One panel per downstream metric: x the gap metric, y the downstream metric, means over seeds with 95 %
    intervals on both axes; one line per method (a sweep's points joined and labelled by the swept value)."""
    plt, fig, axes = _axes(len(downstream), 5.5, 4.5)
    gap_label, gap_metric = gap
    for ax, (label, metric) in zip(axes, downstream):
        for name, points in lines:
            xs, ys, xerr, yerr, labels = [], [], [[], []], [[], []], []
            for variant, point_label in points:
                g, d = interval(values, gap_metric, variant), interval(values, metric, variant)
                if g is None or d is None:
                    continue
                xs.append(g[0])
                ys.append(d[0])
                labels.append(point_label.split("=", 1)[-1] if len(points) > 1 else "")
                for err, (m, lo, hi) in ((xerr, g), (yerr, d)):
                    err[0].append(m - lo if lo is not None else 0.0)
                    err[1].append(hi - m if hi is not None else 0.0)
            if not xs:
                continue
            bars = ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt="o-" if len(xs) > 1 else "s", capsize=2, lw=1.2,
                               ms=5, label=name)
            for x, y, text in zip(xs, ys, labels):
                if text:
                    ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                                color=bars[0].get_color())
        direction = "→ smaller gap" if GAP_DIRECTION.get(gap_metric, 1) > 0 else "← smaller gap"
        ax.set(xlabel=f"{gap_label} ({direction})", ylabel=label, title=label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("closing the gap vs downstream: mean over seeds, 95 % intervals")
    return _save(plt, fig, Path(path))
