"""Training curves of a run from its TensorBoard event files (``<run>/tb``): loss and the live gap."""

from __future__ import annotations

from pathlib import Path

CURVE_TAGS = {"loss": "loss/total", "alignment (live, held-out batch)": "gap/alignment_score"}


def read_scalars(run_dir: str | Path, tags=tuple(CURVE_TAGS.values())) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] sorted by step (the last value wins for a step written twice, e.g. after a resume)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {tag: {} for tag in tags}
    tb = Path(run_dir) / "tb"
    files = sorted(tb.rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime) if tb.is_dir() else []
    for path in files:
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        available = set(acc.Tags().get("scalars", []))
        for tag in tags:
            if tag in available:
                for event in acc.Scalars(tag):
                    out[tag][int(event.step)] = float(event.value)
    return {tag: sorted(values.items()) for tag, values in out.items()}


def plot_curves(curves: dict[str, dict[int, dict[str, list[tuple[int, float]]]]], path: str | Path) -> Path:
    """curves: variant -> seed -> tag -> [(step, value)]. One panel per tag; one colour per variant, one thin line
    per seed and the mean over seeds (at the steps every seed logged) as a thick line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVE_TAGS), figsize=(5.5 * len(CURVE_TAGS), 4), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (label, tag) in zip(axes[0], CURVE_TAGS.items()):
        for i, (variant, seeds) in enumerate(curves.items()):
            colour = colours[i % len(colours)]
            series = [dict(per_seed.get(tag, [])) for per_seed in seeds.values()]
            for points in series:
                if points:
                    ax.plot(list(points), list(points.values()), color=colour, alpha=0.3, lw=0.8)
            common = sorted(set.intersection(*(set(p) for p in series))) if series else []
            if common:
                ax.plot(common, [sum(p[s] for p in series) / len(series) for s in common], color=colour, lw=2,
                        label=f"{variant} (mean of {len(series)} seeds)")
        ax.set(xlabel="step", ylabel=label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    try:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
    return Path(path)
