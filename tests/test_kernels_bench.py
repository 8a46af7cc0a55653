"""tools/bench_loss.py runs end to end at a tiny size and prints one table with dense as the ratio base."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.heavy
def test_bench_loss_prints_one_table_with_ratios_against_dense():
    out = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "bench_loss.py"), "--batch-sizes", "256",
                          "--dim", "32", "--semantic-dim", "16", "--chunk-sizes", "64", "--repeats", "1",
                          "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {line.split()[1]: line.split() for line in out.stdout.splitlines() if line.strip().startswith("256 ")}
    assert set(rows) == {"dense", "chunked/64"}
    assert rows["dense"][3] == "1.000" and rows["dense"][5] == "1.00"  # dense is its own base
    for cells in rows.values():
        assert float(cells[2]) >= 0 and float(cells[4]) > 0  # peak MiB, median seconds


def test_saved_for_backward_counts_the_b_squared_matrices_each_term_keeps():
    from bench_loss import TERMS, saved_for_backward_mib

    batch, dim = 256, 8  # b >> d: the b x b matrices dominate
    b2_floats = lambda weights: saved_for_backward_mib(weights, batch, dim, dim) * 2**20 / (4 * batch**2)  # noqa
    # unrescaled IMSep keeps the similarity with its diagonal set and the softmax; rescaling adds V (1 - S)
    assert b2_floats(TERMS["imsep image D=1"]) == pytest.approx(2.0, abs=0.05)
    assert b2_floats(TERMS["imsep image"]) == pytest.approx(3.0, abs=0.05)
    assert b2_floats(TERMS["imsep both"]) == pytest.approx(2 * b2_floats(TERMS["imsep image"]), rel=0.02)
    assert b2_floats(TERMS["crsep"]) == pytest.approx(2.0, abs=0.1)  # one softmax per direction (+ 2 b d)
    assert b2_floats(TERMS["align"]) < 0.1  # O(b d), no b x b matrix
