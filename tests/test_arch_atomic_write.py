"""The one atomic write (alignclip.fs): old or new content under the final name, never a part, even when the
writing process is killed; and no writer of the package renames files by hand."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import alignclip
from alignclip.fs import atomic_write, publish_dir

PACKAGE = Path(alignclip.__file__).parent
SIZE = 4 << 20  # a write long enough that a kill at a random moment usually lands inside one

# The child rewrites one file with whole blocks of one byte value; it prints a line after each completed write.
# With KILL_BEFORE_RENAME set it SIGKILLs itself once the temporary is complete and fsynced, just before the
# rename: the crash window this module exists for, reached deterministically.
CHILD = f"""
import os, signal, sys
import alignclip.fs as fs
target, rounds = sys.argv[1], int(sys.argv[2])
if os.environ.get("KILL_BEFORE_RENAME"):
    real = os.replace
    def replace_then_die(src, dst):
        os.kill(os.getpid(), signal.SIGKILL)
        real(src, dst)
    fs.os.replace = replace_then_die
for i in range(rounds):
    fs.atomic_write(target, bytes([65 + i % 26]) * {SIZE})
    print(i, flush=True)
"""


def run_child(target: Path, rounds: int, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, str(target), str(rounds)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, **env})


def assert_whole(path: Path) -> bytes:
    data = path.read_bytes()
    assert len(data) == SIZE and data == data[:1] * SIZE, "a torn or truncated file under the final name"
    return data[:1]


def test_kill_between_fsync_and_rename_keeps_the_old_content(tmp_path):
    target = tmp_path / "state.json"
    atomic_write(target, b"Z" * SIZE)
    child = run_child(target, 3, KILL_BEFORE_RENAME="1")
    assert child.wait(timeout=120) == -signal.SIGKILL
    assert child.stdout.read() == ""  # died inside its first write
    assert assert_whole(target) == b"Z"
    leftovers = [p.name for p in tmp_path.iterdir() if p != target]
    assert len(leftovers) == 1 and leftovers[0].startswith(".state.json.tmp-")  # hidden, beside the file


def test_kill_at_any_moment_leaves_a_whole_file(tmp_path):
    """SIGKILL after the child reports k complete writes: the kill lands somewhere in write k+1 (or between
    writes); whatever the moment, the file is one complete version, k or k+1."""
    target = tmp_path / "data.bin"
    for k in (1, 2, 3):
        child = run_child(target, 50)
        for _ in range(k):
            assert child.stdout.readline() != ""
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=120) == -signal.SIGKILL
        assert assert_whole(target) in {bytes([65 + (k - 1) % 26]), bytes([65 + k % 26]), bytes([65 + (k + 1) % 26])}
        for p in tmp_path.glob(".data.bin.tmp-*"):
            p.unlink()


def test_text_bytes_and_a_failed_write(tmp_path):
    path = tmp_path / "a.txt"
    assert atomic_write(path, "grüße\n") == path and path.read_text(encoding="utf-8") == "grüße\n"
    atomic_write(path, b"\x00\xff")
    assert path.read_bytes() == b"\x00\xff"
    with pytest.raises(TypeError):
        atomic_write(path, 3)  # type: ignore[arg-type]
    assert path.read_bytes() == b"\x00\xff" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "missing" / "b.txt", "x")


def test_publish_dir(tmp_path):
    tmp = tmp_path / "step_1.tmp"
    (tmp / "sub").mkdir(parents=True)
    (tmp / "a.bin").write_bytes(b"a")
    (tmp / "sub" / "b.bin").write_bytes(b"b")
    final = publish_dir(tmp, tmp_path / "step_1")
    assert not tmp.exists() and (final / "sub" / "b.bin").read_bytes() == b"b"


def test_no_writer_renames_by_hand():
    """Every replace/rename of a file goes through alignclip.fs (fsync of file and folder included)."""
    # the run-folder lock is a protocol, not a write: an O_EXCL create, and a stale lock renamed aside so that one
    # of several racing trainers wins the take-over
    protocols = {PACKAGE / "training" / "run_lock.py"}
    found = []
    for path in PACKAGE.rglob("*.py"):
        if (path.name == "fs.py" and path.parent == PACKAGE) or path in protocols:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            name = node.func.attr
            by_os = isinstance(node.func.value, ast.Name) and node.func.value.id == "os"
            # Path.replace(target) takes one argument; str.replace(old, new) two
            path_replace = name == "replace" and len(node.args) == 1 and not node.keywords
            if name == "rename" or path_replace or (by_os and name in ("replace", "fsync")):
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} .{name}()")
    assert not found, f"write through alignclip.fs instead: {found}"
