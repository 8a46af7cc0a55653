"""Gap analysis of one or several models side by side: metrics JSON, PNG plots and a Markdown report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

from alignclip.analysis.metrics import explained_variance_ratio, gap_metrics
from alignclip.analysis.plots import plot_cosine_cdf, plot_explained_variance, plot_projection
from alignclip.analysis.report import markdown_table, write_markdown

# The report table's columns, in reading order (all of gap_metrics is in the JSON).
TABLE_COLUMNS = ["alignment_score", "centroid_distance", "rmg_l2", "rmg_cosine", "linear_separability",
                 "uniformity", "cross_modal_uniformity", "alignment_loss", "pca_components_90_image",
                 "pca_components_90_text"]
EXPLAINED_VARIANCE_KEPT = 32  # leading PCA ratios stored per modality in the JSON


def check_same_data(sources: Mapping[str, str], counts: Mapping[str, int]) -> None:
    """Raise ValueError unless every model was measured on the same data source with the same number of pairs:
    gap figures of different samples are not comparable side by side."""
    groups: dict[tuple[str, int], list[str]] = {}
    for name in sources:
        groups.setdefault((sources[name], counts[name]), []).append(name)
    if len(groups) > 1:
        described = "; ".join(f"{', '.join(names)}: {source} ({n} pairs)" for (source, n), names in groups.items())
        raise ValueError(f"the models were measured on different data ({described}); encode them on the same set, "
                         f"or pass --allow-mixed-data to put them side by side anyway")


def _describe_skipped(skipped) -> str:
    if not isinstance(skipped, Mapping):
        return str(skipped)
    return ", ".join(f"{n} {reason}" for reason, n in skipped.items()) or "none"


def analyse_gap(pairs: Mapping[str, tuple], out_dir: str | Path, seed: int = 0, title: str = "Modality gap",
                sources: Mapping[str, str] | None = None, skipped: Mapping[str, Mapping[str, int]] | None = None,
                ) -> dict:
    """pairs: model name -> (image embeddings, text embeddings), row i paired; sources: model name -> the data
    it was measured on (recorded per model as ``data_source``, with the pair count ``num_pairs``); skipped: model
    name -> {reason: samples of the data left out} (``pairs_skipped``; "unknown" when not given). Writes into
    ``out_dir``: gap_metrics.json, cosine_cdf.png, pca_projection.png, explained_variance.png, gap_report.md."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = {}
    for name, (img, txt) in pairs.items():
        figures[name] = gap_metrics(img, txt, seed=seed)
        figures[name]["num_pairs"] = int(len(img))
        figures[name]["data_source"] = (sources or {}).get(name, "unknown")
        figures[name]["pairs_skipped"] = dict(skipped[name]) if skipped and name in skipped else "unknown"
        figures[name]["explained_variance_image"] = explained_variance_ratio(img)[:EXPLAINED_VARIANCE_KEPT].tolist()
        figures[name]["explained_variance_text"] = explained_variance_ratio(txt)[:EXPLAINED_VARIANCE_KEPT].tolist()
    (out / "gap_metrics.json").write_text(json.dumps(figures, indent=2) + "\n")
    pngs = [("CDF of paired cosine similarity", plot_cosine_cdf(pairs, out / "cosine_cdf.png")),
            ("2-D PCA projection of both modalities (grey: pairs)", plot_projection(pairs, out / "pca_projection.png",
                                                                                    seed=seed)),
            ("Cumulative PCA explained variance", plot_explained_variance(pairs, out / "explained_variance.png"))]
    table = markdown_table({name: {c: f[c] for c in TABLE_COLUMNS} for name, f in figures.items()}, TABLE_COLUMNS)
    table += "\n\nData: " + "; ".join(f"{name}: {f['data_source']} ({f['num_pairs']} pairs measured, skipped: "
                                       f"{_describe_skipped(f['pairs_skipped'])})" for name, f in figures.items())
    write_markdown(out / "gap_report.md", title,
                   [("Metrics", table + "\n\nFormulas: docs/analysis.md. All on L2-normalised embeddings; "
                                        f"linear separability with a seeded (seed {seed}) 80/20 split.")],
                   [(caption, png.name) for caption, png in pngs])
    return figures
