"""A seeded chaos harness: tiny real runs (real DeepSpeed, a real loader worker, a real local HTTP shard server, a
real periodic evaluation with its own worker) take one fault from a seeded schedule at a random step and phase,
are restarted as Slurm would restart them, and are checked against the invariant of docs/reliability.md against
an uninterrupted run.

    python -m tests.chaos.harness --trials 50 --seed 1000 --results chaos.jsonl   # random trials, one JSON line each
    python -m tests.chaos.harness --table chaos-*.jsonl                              # fault x phase over files

Faults (``FAULTS``) and phases:
  * TERM / INT / USR1 / HUP / KILL to the trainer; the catchable four also during the start-up count.
  * ``KILL-worker``: SIGKILL to the training loader's worker (a child of the trainer), as the OOM killer does.
  * ``stall``: the shard server holds one transfer of the start-up count (a storage blip; the io timeout ends it).
  * ``server-down``: the shard server answers 503 to everything from a step on, until the trainer has exited (at
    most ``DOWN_S``), then serves again.
  * ``shard-gone``: one shard answers 404 from a step on; restored once the trainer has exited (as an operator
    would restore it before the restart).
  * ``disk-full``: the run folder is on a small tmpfs (root only; the kind is left out otherwise), filled by a
    filler file at a step; the filler is removed before the rerun.
  * ``second-trainer``: the same command started again on the run folder while the first holds it (the first is
    frozen with SIGSTOP meanwhile, so that it is alive and holds the lock however slowly the second starts).
Phases: ``count`` (the start-up count, held at its first shard), ``step`` (after a random step), ``checkpoint``
(while a ``step_N.tmp`` folder exists) and ``eval`` (while the periodic evaluation's worker lives). A save of a
tiny model takes milliseconds, so for the last two the harness freezes the trainer with SIGSTOP the moment it sees
the phase, checks the phase still holds (the ``.tmp`` folder, the evaluation's worker), delivers the fault and lets
it go on with SIGCONT: the fault arrives inside the phase, with no hook in the product.

Outcomes: ``survived`` when, for the kind,
  * a signal or ``KILL-worker`` / ``server-down``: the run (restarted on exit 124 or death by a signal, as Slurm
    requeues) ended with the uninterrupted run's weights (max |difference| <= 1e-6), and a run that stopped with
    124 after a catchable signal, a dead worker or the outage in the step, checkpoint or eval phase had saved at
    least the step the fault arrived at (or the checkpoint / evaluation it arrived in);
  * ``shard-gone``: the run finished; its weights equal the uninterrupted run's, or differ and the shard is named
    as skipped on the console and counted in train.log (the documented policy for a vanished shard: counted,
    named, skipped; the epoch keeps its length);
  * ``disk-full``: the trainer stopped with exit 2 and one ``run folder error:`` line (no traceback), the newest
    checkpoint verifies against its manifest, and the rerun with the filler gone ended with the uninterrupted
    run's weights (or the run had finished before it needed the disk);
  * ``second-trainer``: the second exited 2 naming the first's PID and the first ended with the uninterrupted
    run's weights.
``lost``: a run that stopped with 1 (or 2 where 2 is not the answer), did not finish within the restarts, saved
less than the step it should have, or broke the kind's expectation above; ``wrong``: finished with other weights.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from tests.helpers.launch import final_weights, max_weight_difference
from tests.helpers.processes import launch, latest_step
from tests.helpers.shard_server import serve
from tests.helpers.tiny import tiny_overrides, write_toy_shards
from tests.helpers.tmpfs import tmpfs

# one epoch of 16 shards of 8 samples; one batch in flight (prefetch 1): the reader opens shards up to step 6,
# so a fault in the shard server at a step meets its reads
STEPS, CHECKPOINT_EVERY, EVAL_EVERY, PER_SHARD = 8, 2, 3, 8
SHARDS = [f"{i:05d}.tar" for i in range(16)]
DOWN_S = 60.0  # the longest outage: a trainer that needs no shard for this long is left alone
SIGNALS = ("TERM", "INT", "USR1", "HUP")
FAULTS = {**{s: ("count", "step", "checkpoint", "eval") for s in SIGNALS}, "KILL": ("step", "checkpoint", "eval"),
          "KILL-worker": ("step",), "stall": ("count",), "server-down": ("step",), "shard-gone": ("step",),
          "disk-full": ("step",), "second-trainer": ("step",)}
NEEDS_ROOT = {"disk-full"}
# data faults arrive by step 4, while at least 4 of the 16 shards are still to be opened
DATA_FAULTS, READS_UNTIL = {"KILL-worker", "server-down", "shard-gone"}, 4
MUST_SAVE = set(SIGNALS) | {"KILL-worker", "server-down"}  # a stop after these saves the step they arrived at
_STEP_LINE = re.compile(r" INFO step (\d+) ")


def available_faults() -> list[str]:
    """The fault kinds this process can inject (mounting a tmpfs needs root)."""
    return sorted(f for f in FAULTS if f not in NEEDS_ROOT or os.geteuid() == 0)


@dataclass(frozen=True)
class Trial:
    seed: int
    fault: str
    phase: str
    step: int  # the step after which a fault arrives (step, checkpoint and eval phases: the next one from here)

    @classmethod
    def draw(cls, seed: int) -> "Trial":
        rng = random.Random(seed)
        fault = rng.choice(available_faults())
        last = READS_UNTIL if fault in DATA_FAULTS else STEPS - 1
        return cls(seed, fault, rng.choice(FAULTS[fault]), rng.randint(1, last))


# ------------------------------------------------------------------------------------------ processes
def _logged_step(run: Path) -> int:
    log = run / "train.log"
    steps = [int(m.group(1)) for m in _STEP_LINE.finditer(log.read_text(errors="replace"))] if log.is_file() else []
    return max(steps, default=0)


def _wait(predicate: Callable[[], bool], proc: subprocess.Popen, timeout: float, poll: float = 0.05) -> bool:
    """True once ``predicate()`` holds; False when the process ended first or the time ran out."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(poll)
    return True


def _children(pid: int) -> list[int]:
    """Child processes of ``pid`` that are not curl (the shard reader's transfers): loader workers."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(c) for c in task.read_text().split()]
        except OSError:
            continue
    out = []
    for child in found:
        try:
            if Path(f"/proc/{child}/comm").read_text().strip() != "curl":
                out.append(child)
        except OSError:
            continue
    return out


def _freeze(proc: subprocess.Popen) -> bool:
    """SIGSTOP the trainer and wait until it is stopped; False when it ended."""
    proc.send_signal(signal.SIGSTOP)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            state = Path(f"/proc/{proc.pid}/stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            return False
        if state in ("T", "t"):
            return True
        time.sleep(0.001)
    return False


def _thaw(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)


def _fill(path: Path) -> None:
    """Write ``path`` until its file system has no byte left."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        chunk = 1 << 20
        block = b"\0" * chunk
        while chunk:
            try:
                os.write(fd, block[:chunk])
            except OSError as err:
                if err.errno != errno.ENOSPC:
                    raise
                chunk //= 2
    finally:
        os.close(fd)


def _draw_eval_set(folder: Path) -> None:
    """A small ImageFolder for the periodic evaluation: three classes, non-square JPEGs and a transparent PNG."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, (name, rgb) in enumerate((("red", (220, 30, 30)), ("green", (30, 200, 40)), ("blue", (30, 60, 220)))):
        (folder / name).mkdir(parents=True)
        for i in range(4):
            h, w = (24 + 7 * i, 40 - 5 * i)
            pixels = np.full((h, w, 3), rgb, np.uint8) + rng.integers(0, 20, (h, w, 3), dtype=np.uint8)
            if c == 2 and i == 3:
                alpha = np.full((h, w, 1), 128, np.uint8)
                Image.fromarray(np.concatenate([pixels, alpha], 2), "RGBA").save(folder / name / f"{i}.png")
            else:
                Image.fromarray(pixels).save(folder / name / f"{i}.jpg", quality=90)


# ------------------------------------------------------------------------------------------- the harness
class Harness:
    """The shard server, the shards, the evaluation set and the uninterrupted reference run, shared by the
    trials."""

    def __init__(self, root: Path):
        self.root = root
        write_toy_shards(root / "www" / "shards", num_shards=len(SHARDS), per_shard=PER_SHARD, seed=0)
        for stats in (root / "www" / "shards").glob("*_stats.json"):
            stats.unlink()  # the start-up count reads the shards: a phase to inject faults into
        _draw_eval_set(root / "evalset")
        self._serving = serve(root / "www")
        self.base, self.server = self._serving.__enter__()
        reference = root / "reference"
        reference.mkdir()
        code = self._run_to_end(reference / "run", root / "cache-reference", reference, [])
        assert code == "survived", f"the uninterrupted reference run failed: {code}"
        self.reference = final_weights(reference / "run")

    def close(self) -> None:
        self._serving.__exit__(None, None, None)

    def overrides(self, run: Path, cache: Path) -> list[str]:
        data = {"train": f"{self.base}/shards/{{00000..{len(SHARDS) - 1:05d}}}.tar",
                "val": f"{self.base}/shards/{SHARDS[-1]}"}
        return tiny_overrides(data, run, **{
            "train.max_steps": STEPS, "checkpoint.every_steps": CHECKPOINT_EVERY, "data.workers": 1,
            "data.prefetch_factor": 1, "checkpoint.keep": 2,
            "data.io_timeout_s": 5, "data.io_retries": 1, "data.cache_dir": str(cache),
            "eval.every_steps": EVAL_EVERY, "eval.dataset": "imagefolder", "eval.root": str(self.root / "evalset"),
            "eval.workers": 1, "eval.batch_size": 4})

    def _launch(self, run: Path, cache: Path, log_dir: Path) -> subprocess.Popen:
        log_dir.mkdir(parents=True, exist_ok=True)
        return launch(self.overrides(run, cache), log_dir=log_dir)[0]

    def _run_to_end(self, run: Path, cache: Path, log_dir: Path, log: list[str], restarts: int = 3) -> str:
        for _ in range(restarts + 1):
            code = self._launch(run, cache, log_dir).wait(timeout=900)
            log.append(f"exit {code}")
            if code == 0:
                return "survived"
            if code != 124 and code >= 0:
                return "lost"
        return "lost"

    def run(self, trial: Trial) -> tuple[str, str]:
        """(outcome, what happened)."""
        folder = self.root / f"trial-{trial.seed}"
        folder.mkdir(parents=True)
        with contextlib.ExitStack() as disk:
            run = folder / "run"
            if trial.fault == "disk-full":
                run = disk.enter_context(tmpfs(folder / "disk", "128m")) / "run"
            try:
                return self._trial(trial, folder, run)
            finally:
                self.server.release.set()
                self.server.down.clear()
                self.server.missing.clear()

    def _trial(self, trial: Trial, folder: Path, run: Path) -> tuple[str, str]:
        server, cache, events = self.server, folder / "cache", []  # a count per trial: the count is a phase
        server.stalled.clear()
        server.release.clear()
        if trial.phase == "count":
            server.stall_next.set()  # hold the count at its first shard until the fault is in
        proc = self._launch(run, cache, folder)
        try:
            at = self._reach(trial, proc, run)
            if at is None:
                return "lost", f"the run ended before the {trial.phase} phase: exit {proc.poll()}"
            events.append(f"{trial.fault} at {trial.phase}{f' {at}' if at else ''}")
            check = self._inject(trial, proc, folder, run, cache, events)
            code = proc.wait(timeout=900)
        finally:
            server.stall_next.clear()
            server.release.set()  # a held transfer ends (the trainer's io timeout has abandoned it by now)
            server.down.clear()
            server.missing.clear()  # the operator restores the shard before the restart
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        saved = latest_step(run)
        events.append(f"exit {code}, newest checkpoint step {saved}")
        problem = check(code) if check else None
        if problem:
            return "lost", "; ".join(events + [problem])
        if trial.fault in MUST_SAVE and code == 124 and at and saved < at:
            return "lost", "; ".join(events + [f"step {at} was not saved"])
        if code not in (0, 124) and code >= 0 and not (trial.fault == "disk-full" and code == 2):
            return "lost", "; ".join(events)
        if code != 0:
            if trial.fault == "disk-full":
                (run.parent / "filler").unlink()
                events.append("filler removed, rerun")
            if self._run_to_end(run, cache, folder, events) != "survived":
                return "lost", "; ".join(events)
        difference = max_weight_difference(self.reference, final_weights(run))
        events.append(f"max |w - w_ref| = {difference:.3g}")
        if difference <= 1e-6:
            return "survived", "; ".join(events)
        if trial.fault == "shard-gone" and _skip_named(trial, folder / "rank0.out", run):
            return "survived", "; ".join(events + [f"{_gone_shard(trial)} skipped: named on the console, counted "
                                                   f"in train.log"])
        return "wrong", "; ".join(events)

    # ------------------------------------------------------------------------------- reaching a phase
    def _reach(self, trial: Trial, proc: subprocess.Popen, run: Path) -> int | None:
        """Wait for the trial's phase; the step it arrived at (0 in the count), None when the run ended first.
        In the checkpoint and eval phases the trainer is left frozen (SIGSTOP) for ``_inject``."""
        if trial.phase == "count":
            return 0 if _wait(self.server.stalled.is_set, proc, 600) else None
        if not _wait(lambda: _logged_step(run) >= trial.step, proc, 900):
            return None
        if trial.phase == "step":
            return _logged_step(run)
        if trial.phase == "checkpoint":
            return self._catch(proc, lambda: _tmp_checkpoint(run))
        workers = set(_children(proc.pid))  # the training loader's
        return self._catch(proc, lambda: (_eval_step(run) if set(_children(proc.pid)) - workers else None))

    @staticmethod
    def _catch(proc: subprocess.Popen, probe: Callable[[], int | None]) -> int | None:
        """Poll ``probe`` (1 ms); when it gives a step, freeze the trainer and probe again: the step when the phase
        still holds (the trainer left frozen), else thaw and go on polling."""
        while proc.poll() is None:
            if probe() is not None:
                if not _freeze(proc):
                    return None
                step = probe()
                if step is not None:
                    return step
                _thaw(proc)
            time.sleep(0.001)
        return None

    # ------------------------------------------------------------------------------- injecting a fault
    def _inject(self, trial: Trial, proc: subprocess.Popen, folder: Path, run: Path, cache: Path,
                events: list[str]) -> Callable[[int], str | None] | None:
        """Deliver the fault (the trainer may be frozen: thawed after); a check of the first exit code, if the
        kind has one."""
        fault, server = trial.fault, self.server
        if fault in SIGNALS or fault == "KILL":
            proc.send_signal(getattr(signal, f"SIG{fault}"))
            _thaw(proc)
            return None
        if fault == "stall":
            return None  # the held transfer is the fault
        if fault == "KILL-worker":
            workers = _children(proc.pid)
            if not workers:
                return lambda code: "no loader worker to kill"
            os.kill(workers[0], signal.SIGKILL)
            return None
        if fault == "server-down":
            server.down.set()
            _wait(lambda: False, proc, DOWN_S)
            server.down.clear()
            return None
        if fault == "shard-gone":
            server.missing.add(_gone_shard(trial))
            events[0] += f" ({_gone_shard(trial)})"
            return None
        if fault == "disk-full":
            _fill(run.parent / "filler")
            return lambda code: _one_line_and_intact(code, folder / "rank0.out", run)
        if fault == "second-trainer":
            if not _freeze(proc):  # the first holds the lock, alive, while the second starts
                return lambda code: "the first trainer ended before the second started"
            try:
                second = self._launch(run, cache, folder / "second")
                code = second.wait(timeout=600)
            finally:
                _thaw(proc)
            text = (folder / "second" / "rank0.out").read_text(errors="replace")
            events.append(f"second trainer exit {code}")
            refused = code == 2 and "is in use by another trainer" in text and f"PID {proc.pid}" in text
            return None if refused else (lambda _: f"the second trainer was not refused: {text[-300:]!r}")
        raise ValueError(f"unknown fault {fault!r}")


def _gone_shard(trial: Trial) -> str:
    return random.Random(f"shard-{trial.seed}").choice(SHARDS)  # a stream of its own, not the draw's


def _skip_named(trial: Trial, output: Path, run: Path) -> bool:
    """The gone shard named as skipped on the console (the loader workers' warnings go there, as to a Slurm job's
    output) and the skip counted in train.log."""
    console = output.read_text(errors="replace")
    named = re.search(rf"skipped \(unreadable_shard\) \S+/{re.escape(_gone_shard(trial))} ", console)
    counted = re.search(r"skipped \{[^}]*'unreadable_shard': [1-9]", (run / "train.log").read_text(errors="replace"))
    return bool(named and counted)


def _tmp_checkpoint(run: Path) -> int | None:
    found = sorted((run / "checkpoints").glob("step_*.tmp"))
    return int(found[-1].name[len("step_"):-len(".tmp")]) if found else None


def _eval_step(run: Path) -> int:
    """The step being evaluated: the one after the last logged (the step line follows its evaluation)."""
    return _logged_step(run) + 1


def _one_line_and_intact(code: int, output: Path, run: Path) -> str | None:
    """A full run folder: exit 2, one ``run folder error:`` line and no traceback, the newest checkpoint intact."""
    from alignclip.checkpoints import find_latest, verify_manifest

    if code == 0:
        return None  # finished before it needed the disk
    text = output.read_text(errors="replace")
    lines = [line for line in text.splitlines() if line.startswith("run folder error: ")]
    if code != 2 or len(lines) != 1 or "Traceback" in text:
        return f"not one line and exit 2 (exit {code}, {len(lines)} lines): {text[-600:]!r}"
    latest = find_latest(run)
    problem = verify_manifest(latest) if latest is not None else None
    return f"the newest checkpoint does not verify: {problem}" if problem else None


# --------------------------------------------------------------------------------------------- results
def table(rows: list[dict]) -> str:
    """fault x phase: survived / lost / wrong, over result rows (``--results`` lines)."""
    counts: dict[tuple[str, str], collections.Counter] = collections.defaultdict(collections.Counter)
    for row in rows:
        counts[row["fault"], row["phase"]][row["outcome"]] += 1
    lines = ["| fault | phase | survived | lost | wrong |", "|---|---|---|---|---|"]
    for (fault, phase), c in sorted(counts.items()):
        lines.append(f"| {fault} | {phase} | {c['survived']} | {c['lost']} | {c['wrong']} |")
    total = collections.Counter(row["outcome"] for row in rows)
    lines.append(f"| all | | {total['survived']} | {total['lost']} | {total['wrong']} |")
    return "\n".join(lines)


def read_results(paths: list[str]) -> list[dict]:
    rows = []
    for path in paths:
        rows += [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return rows


def summary(rows: list[dict]) -> str:
    seconds = sum(row["seconds"] for row in rows)
    failed = [row for row in rows if row["outcome"] != "survived"]
    out = [table(rows), f"{len(rows)} trials, {seconds / 60:.1f} min of trials, "
                        f"{seconds / max(len(rows), 1):.1f} s per trial"]
    out += [f"{row['outcome']}: seed {row['seed']} {row['fault']} {row['phase']}: {row['detail']}" for row in failed]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0, help="trial i uses seed SEED + i")
    parser.add_argument("--root", default="", help="work folder (default: a temporary one)")
    parser.add_argument("--results", default="", help="append one JSON line per trial to this file")
    parser.add_argument("--table", nargs="+", metavar="FILE", help="print the table of these results files, run none")
    args = parser.parse_args(argv)
    if args.table:
        rows = read_results(args.table)
        print(summary(rows))
        return 0 if all(row["outcome"] == "survived" for row in rows) else 1
    rows = []
    with tempfile.TemporaryDirectory(prefix="alignclip-chaos-") as tmp:
        harness = Harness(Path(args.root or tmp))
        try:
            for i in range(args.trials):
                trial, started = Trial.draw(args.seed + i), time.monotonic()
                outcome, detail = harness.run(trial)
                if outcome == "survived":  # ~50 MB of checkpoints a trial; a failed trial's folder is kept
                    shutil.rmtree(harness.root / f"trial-{trial.seed}", ignore_errors=True)
                row = {**asdict(trial), "outcome": outcome, "detail": detail,
                       "seconds": round(time.monotonic() - started, 1)}
                rows.append(row)
                if args.results:
                    with open(args.results, "a") as out:
                        out.write(json.dumps(row) + "\n")
                print(f"trial {i + 1}/{args.trials} seed {trial.seed}: {outcome}: {detail}", flush=True)
        finally:
            harness.close()
    print(summary(rows))
    return 0 if all(row["outcome"] == "survived" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
