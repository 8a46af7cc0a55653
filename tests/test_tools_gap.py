"""Gap analysis writes its JSON, plots and report, and ranks a gapped model below an aligned one."""

import json

import numpy as np

from alignclip.analysis.gap import analyse_gap
from alignclip.analysis.report import markdown_table


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_gap_analysis_side_by_side(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.normal(size=(120, 16))
    aligned = (_unit(base), _unit(base + 0.1 * rng.normal(size=base.shape)))
    gapped = (_unit(base + 4.0), _unit(base - 4.0))
    figures = analyse_gap({"aligned": aligned, "gapped": gapped}, tmp_path)
    for name in ("gap_metrics.json", "cosine_cdf.png", "pca_projection.png", "explained_variance.png",
                 "gap_report.md"):
        assert (tmp_path / name).stat().st_size > 0, name
    on_disk = json.loads((tmp_path / "gap_metrics.json").read_text())
    assert on_disk["aligned"]["alignment_score"] == figures["aligned"]["alignment_score"]
    assert figures["aligned"]["centroid_distance"] < figures["gapped"]["centroid_distance"]
    assert figures["gapped"]["linear_separability"] == 1.0
    report = (tmp_path / "gap_report.md").read_text()
    assert "![CDF of paired cosine similarity](cosine_cdf.png)" in report
    assert "| aligned |" in report and "| gapped |" in report


def test_markdown_table_marks_missing_cells():
    table = markdown_table({"a": {"x": 1.0}, "b": {"y": 2}})
    assert table.splitlines() == ["| model | x | y |", "|---|---|---|", "| a | 1.0000 | - |", "| b | - | 2 |"]
