"""The process's host memory from /proc (Linux): the figures the CPU benchmarks report as peak memory."""

from __future__ import annotations

import os
import re


def status_kib(key: str) -> int:
    """A ``/proc/self/status`` field in KiB, e.g. ``VmRSS`` (resident now) or ``VmHWM`` (resident high-water mark)."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+)", f.read(), re.M).group(1))


def reset_peak_rss() -> None:
    """Reset VmHWM to the current resident size, so the next peak is the measured code's own."""
    if os.path.exists("/proc/self/clear_refs"):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
