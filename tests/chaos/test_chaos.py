"""The chaos harness's fixed trials: every fault kind at least once (the start-up count and the step phases),
each restarted as Slurm would and checked against an uninterrupted run. ``python -m tests.chaos.harness`` runs
random trials for longer."""

from __future__ import annotations

import pytest

from tests.chaos.harness import Harness, Trial

pytestmark = [pytest.mark.heavy, pytest.mark.timeout(3600)]

TRIALS = [Trial(1, "TERM", "step", 3), Trial(2, "INT", "count", 0), Trial(3, "USR1", "step", 1),
          Trial(4, "HUP", "count", 0), Trial(5, "KILL", "step", 3), Trial(6, "stall", "count", 0),
          Trial(7, "HUP", "step", 3)]


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    h = Harness(tmp_path_factory.mktemp("chaos"))
    yield h
    h.close()


@pytest.mark.parametrize("trial", TRIALS, ids=lambda t: f"{t.fault}-{t.phase}")
def test_a_fault_ends_as_the_uninterrupted_run(harness, trial):
    outcome, detail = harness.run(trial)
    assert outcome == "survived", detail
