"""The config's walk from the training entry point goes down only.

A tiny AlignCLIP run (lock, plan, engine, resume, parts, 3 steps with gap metrics and a checkpoint) is
started at ``alignclip.train.main`` in a child process that records every read of a config key with the stack of
modules that led to it (``tests/helpers/config_walk.py``). Mapped to rooms (``alignclip.data``,
``alignclip.training`` ...), each stack must go strictly down the floors of the import graph (a room's floor is one
more than the highest room it imports): no read is reached by climbing back up, and no room is entered twice on the
way to a read. Recorded the same way from its Trainer, the release before the run plan (c85906b) had 809 of its
1,200 reads climbing or re-entering (through the ``training > config`` and ``training > data`` circles); now 0.
"""

from __future__ import annotations

import collections
import json
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT
from tests.helpers.processes import child_env
from tests.helpers.tiny import tiny_overrides
from tests.test_arch_imports import import_graph, room

pytestmark = pytest.mark.heavy
ENTRY = "alignclip.train"


def floors() -> dict[str, int]:
    """Room -> floor: 0 for a room that imports no other, else one more than the highest room it imports."""
    below: dict[str, set[str]] = collections.defaultdict(set)
    for module, targets in import_graph().items():
        if module != "alignclip":
            below[room(module)].update(room(t) for t in targets if room(t) != room(module))
    found: dict[str, int] = {}

    def floor(r: str) -> int:
        if r not in found:
            found[r] = 1 + max((floor(d) for d in below.get(r, ())), default=-1)
        return found[r]

    for r in list(below):
        floor(r)
    return found


def rooms_of(stack: list[str]) -> list[str]:
    """The package rooms a stack passes through from the entry point's body on (``alignclip.train``'s last frame:
    the error boundary ``alignclip.errors.run_command`` calls the body back), consecutive repeats merged, frames
    outside the package dropped."""
    entry = max((i for i, module in enumerate(stack) if module == ENTRY), default=0)
    out: list[str] = []
    for module in stack[entry:]:
        if module.startswith("alignclip.") and (not out or out[-1] != room(module)):
            out.append(room(module))
    return out


@pytest.fixture(scope="module")
def walk(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("walk")
    overrides = tiny_overrides(tmp / "data", tmp / "run", alignclip=True,
                               **{"train.max_steps": 3, "checkpoint.every_steps": 2, "logging.gap_every_steps": 2})
    out = tmp / "walk.json"
    done = subprocess.run([sys.executable, "-m", "tests.helpers.config_walk", str(out), *overrides], cwd=REPO_ROOT,
                          env=child_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())["reads"]


def test_every_config_read_is_reached_going_down_only(walk):
    floor = floors()
    climbing = collections.Counter()
    for read in walk:
        rooms = rooms_of(read["stack"])
        if any(floor[lower] >= floor[upper] for upper, lower in zip(rooms, rooms[1:])):
            climbing[" > ".join(rooms)] += 1
    assert len(walk) > 500 and not climbing, f"{sum(climbing.values())} of {len(walk)} reads: {climbing.most_common()}"


def test_the_walk_sees_every_part(walk):
    """The check itself: the recorder saw the plan, the data, the model, the loss and the periodic parts read."""
    readers = {module for read in walk for module in read["stack"][-1:]}
    for module in ("alignclip.training.plan", "alignclip.data.pipeline", "alignclip.models.factory",
                   "alignclip.losses.objective", "alignclip.training.parts", "alignclip.distributed.layout"):
        assert module in readers, sorted(readers)
    assert floors()["alignclip.training"] > floors()["alignclip.data"] > floors()["alignclip.config"]


def test_a_climbing_stack_is_found():
    floor = floors()
    rooms = rooms_of(["alignclip.train", "alignclip.errors", "alignclip.train", "alignclip.training.trainer",
                      "alignclip.data.pipeline", "alignclip.training.preemption"])
    assert rooms == ["alignclip.train", "alignclip.training", "alignclip.data", "alignclip.training"]
    assert any(floor[lower] >= floor[upper] for upper, lower in zip(rooms, rooms[1:]))
