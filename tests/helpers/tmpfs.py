"""A real small file system for the full-disk and read-only tests: ``with tmpfs(point, "2m") as mount: ...``."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest


@contextlib.contextmanager
def tmpfs(point: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (mount's syntax: ``1m``, ``64m``) at ``point`` (created), unmounted on the way out.
    Mounting needs root: the test is skipped otherwise."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    point.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], check=True, timeout=30)
    try:
        yield point
    finally:
        # lazily: a file a test still holds open (a logger's) must not keep the mount alive
        subprocess.run(["umount", "--lazy", str(point)], check=False, timeout=30)
