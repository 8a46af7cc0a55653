"""A seeded chaos harness: tiny real runs (real DeepSpeed, a real loader worker, a real local HTTP shard server)
take one fault from a seeded schedule at a random step or phase, are restarted as Slurm would restart them, and
are checked against the invariant of docs/reliability.md against an uninterrupted run.

    python -m tests.chaos.harness --trials 200 --seed 0      # the long mode: N random trials, then a table

Outcomes: ``survived`` (the run ended with the uninterrupted run's weights, and a catchable signal saved at the
step it arrived), ``lost`` (a run that stopped with 1 / 2, did not finish within the restarts, or whose save after
a catchable signal was older than that step), ``wrong`` (finished with other weights). Slurm's restart: exit 124
(requeue) and death by a signal (a node failure's requeue) start the same command again.
"""

from __future__ import annotations

import argparse
import collections
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.launch import final_weights, max_weight_difference
from tests.helpers.processes import launch, latest_step
from tests.helpers.shard_server import serve
from tests.helpers.tiny import tiny_overrides, write_toy_shards

STEPS = 6
# fault -> the phases it is injected in. "stall": the shard server stalls one transfer (a storage blip), held
# until the trainer's io timeout ends it; the signals go to the trainer process.
FAULTS = {"TERM": ("count", "step"), "INT": ("count", "step"), "USR1": ("count", "step"), "HUP": ("count", "step"),
          "KILL": ("step",), "stall": ("count",)}
CATCHABLE = {"TERM", "INT", "USR1", "HUP"}
_STEP_LINE = re.compile(r" INFO step (\d+) ")


@dataclass(frozen=True)
class Trial:
    seed: int
    fault: str
    phase: str
    step: int  # the step after which a "step" fault arrives

    @classmethod
    def draw(cls, seed: int) -> "Trial":
        rng = random.Random(seed)
        fault = rng.choice(sorted(FAULTS))
        return cls(seed, fault, rng.choice(FAULTS[fault]), rng.randint(1, STEPS - 1))


def _overrides(base: str, run: Path, cache: Path) -> list[str]:
    data = {"train": f"{base}/shards/{{00000..00003}}.tar", "val": f"{base}/shards/00003.tar"}
    return tiny_overrides(data, run, **{"train.max_steps": STEPS, "checkpoint.every_steps": 2, "data.workers": 1,
                                        "data.io_timeout_s": 5, "data.io_retries": 1,
                                        "data.cache_dir": str(cache)})


def _logged_step(run: Path) -> int:
    log = run / "train.log"
    steps = [int(m.group(1)) for m in _STEP_LINE.finditer(log.read_text())] if log.is_file() else []
    return max(steps, default=0)


def _wait(predicate, proc: subprocess.Popen, timeout: float) -> bool:
    """True once ``predicate()`` holds; False when the process ended first or the time ran out."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


class Harness:
    """The shard server, the shards and the uninterrupted reference run, shared by the trials."""

    def __init__(self, root: Path):
        self.root = root
        write_toy_shards(root / "www" / "shards", num_shards=4, per_shard=32, seed=0)
        for stats in (root / "www" / "shards").glob("*_stats.json"):
            stats.unlink()  # the start-up count reads the shards: a phase to inject faults into
        self._serving = serve(root / "www")
        self.base, self.server = self._serving.__enter__()
        reference = root / "reference"
        code = self._run_to_end(reference, root / "cache-reference", [])
        assert code == "survived", f"the uninterrupted reference run failed: {code}"
        self.reference = final_weights(reference)

    def close(self) -> None:
        self._serving.__exit__(None, None, None)

    def _run_to_end(self, run: Path, cache: Path, log: list[str], restarts: int = 3) -> str:
        for _ in range(restarts + 1):
            proc = launch(_overrides(self.base, run, cache), log_dir=run.parent)[0]
            code = proc.wait(timeout=900)
            log.append(f"exit {code}")
            if code == 0:
                return "survived"
            if code != 124 and code >= 0:
                return "lost"
        return "lost"

    def run(self, trial: Trial) -> tuple[str, str]:
        """(outcome, what happened)."""
        run = self.root / f"trial-{trial.seed}" / "run"
        cache = run.parent / "cache"  # a count per trial: the start-up count is a phase
        run.parent.mkdir(parents=True)
        server, events = self.server, []
        server.stalled.clear()
        server.release.clear()
        if trial.phase == "count":
            server.stall_next.set()  # hold the count at its first shard until the fault is in
        proc = launch(_overrides(self.base, run, cache), log_dir=run.parent)[0]
        at = 0
        try:
            if trial.phase == "count":
                reached = _wait(server.stalled.is_set, proc, 600)
            else:
                reached = _wait(lambda: _logged_step(run) >= trial.step, proc, 900)
                at = _logged_step(run)
            if not reached:
                return "lost", f"the run ended before the {trial.phase} phase: exit {proc.poll()}"
            if trial.fault != "stall":
                proc.send_signal(getattr(signal, f"SIG{trial.fault}"))
            code = proc.wait(timeout=900)
        finally:
            server.release.set()  # a held transfer ends (the trainer's io timeout has abandoned it by now)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        events.append(f"{trial.fault} at {trial.phase}{f' (step {at})' if at else ''}: exit {code}")
        saved = latest_step(run)
        if trial.fault in CATCHABLE and code != 0 and trial.phase == "step" and saved < at:
            return "lost", "; ".join(events + [f"newest checkpoint step {saved} < step {at} at the signal"])
        if code not in (0, 124) and code >= 0:
            return "lost", "; ".join(events)
        if code != 0:
            outcome = self._run_to_end(run, cache, events)
            if outcome != "survived":
                return outcome, "; ".join(events)
        difference = max_weight_difference(self.reference, final_weights(run))
        events.append(f"max |w - w_ref| = {difference:.3g}")
        return ("survived" if difference <= 1e-6 else "wrong"), "; ".join(events)


def table(results: list[tuple[Trial, str, str]]) -> str:
    """fault x phase: survived / lost / wrong."""
    counts: dict[tuple[str, str], collections.Counter] = collections.defaultdict(collections.Counter)
    for trial, outcome, _ in results:
        counts[trial.fault, trial.phase][outcome] += 1
    lines = ["| fault | phase | survived | lost | wrong |", "|---|---|---|---|---|"]
    for (fault, phase), c in sorted(counts.items()):
        lines.append(f"| {fault} | {phase} | {c['survived']} | {c['lost']} | {c['wrong']} |")
    total = collections.Counter(outcome for _, outcome, _ in results)
    lines.append(f"| all | | {total['survived']} | {total['lost']} | {total['wrong']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0, help="trial i uses seed SEED + i")
    parser.add_argument("--root", default="", help="work folder (default: a temporary one)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="alignclip-chaos-") as tmp:
        harness = Harness(Path(args.root or tmp))
        results = []
        try:
            for i in range(args.trials):
                trial = Trial.draw(args.seed + i)
                outcome, detail = harness.run(trial)
                results.append((trial, outcome, detail))
                print(f"trial {i + 1}/{args.trials} seed {trial.seed}: {outcome}: {detail}", flush=True)
        finally:
            harness.close()
    print(table(results))
    return 0 if all(outcome == "survived" for _, outcome, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
