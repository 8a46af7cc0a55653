"""The chaos harness's fixed trials: every fault kind at least once, across the phases (start-up count, step,
checkpoint write, evaluation), each restarted as Slurm would and checked against an uninterrupted run.
``python -m tests.chaos.harness`` runs random trials for longer."""

from __future__ import annotations

import pytest

from tests.chaos.harness import FAULTS, Harness, Trial, available_faults

pytestmark = [pytest.mark.heavy, pytest.mark.timeout(3600)]

TRIALS = [Trial(1, "TERM", "step", 3), Trial(2, "INT", "count", 0), Trial(3, "USR1", "checkpoint", 1),
          Trial(4, "HUP", "eval", 2), Trial(5, "KILL", "checkpoint", 3), Trial(6, "stall", "count", 0),
          Trial(7, "KILL-worker", "step", 2), Trial(8, "server-down", "step", 2), Trial(9, "shard-gone", "step", 1),
          Trial(10, "disk-full", "step", 3), Trial(11, "second-trainer", "step", 2), Trial(12, "KILL", "eval", 4)]


def test_the_fixed_trials_cover_every_fault_kind_and_phase():
    assert {t.fault for t in TRIALS} == set(FAULTS)
    assert {t.phase for t in TRIALS} == {p for phases in FAULTS.values() for p in phases}
    assert all(t.phase in FAULTS[t.fault] for t in TRIALS)


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    h = Harness(tmp_path_factory.mktemp("chaos"))
    yield h
    h.close()


@pytest.mark.parametrize("trial", TRIALS, ids=lambda t: f"{t.fault}-{t.phase}")
def test_a_fault_ends_as_the_uninterrupted_run(harness, trial):
    if trial.fault not in available_faults():
        pytest.skip(f"{trial.fault} needs root (a tmpfs mount)")
    outcome, detail = harness.run(trial)
    print(f"\n{trial}: {outcome}: {detail}")
    assert outcome == "survived", detail
