"""Shell brace patterns: ``a/{000..002}.tar`` and ``{x,y}.tar`` expanded as bash does, and the inverse (the pattern
that a list of shell-expanded words came from). Standard library only: the config check uses it before torch or
the data pipeline is imported."""

from __future__ import annotations

import os
import re
from typing import Sequence

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def expand_braces(pattern: str) -> list[str]:
    """``a/{000..002}.tar`` -> a/000.tar a/001.tar a/002.tar (zero padding kept); ``{x,y}`` -> both; nested ok."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[:match.start()], match.group(1), pattern[match.end():]
    numeric = _RANGE.match(body)
    if numeric:
        lo, hi = numeric.group(1), numeric.group(2)
        width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0
        step = 1 if int(hi) >= int(lo) else -1
        choices = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    else:
        choices = body.split(",")
    return [expanded for choice in choices for expanded in expand_braces(head + choice + tail)]


def brace_pattern_of(values: Sequence[str]) -> str | None:
    """The brace pattern whose expansion gives ``values``, when they look like one: the same head and tail around
    consecutive integers of one width (``a/00000.tar a/00001.tar`` -> ``a/{00000..00001}.tar``) or around a list
    of words (``a/x.tar a/y.tar`` -> ``a/{x,y}.tar``). None otherwise. Used to explain a shell-expanded override."""
    if len(values) < 2 or len(set(values)) < len(values):
        return None
    head = os.path.commonprefix(list(values))
    tail = os.path.commonprefix([v[len(head):][::-1] for v in values])[::-1]
    if any(c.isdigit() for c in head[-1:]):  # keep a range's leading digits inside the braces (00012 -> 0001|2)
        head = head.rstrip("0123456789")
    if any(c.isdigit() for c in tail[:1]):
        tail = tail.lstrip("0123456789")
    middles = [v[len(head):len(v) - len(tail)] for v in values]
    if not (head or tail) or not all(middles):
        return None
    padded = any(len(m) > 1 and m.startswith("0") for m in middles)
    if all(m.isdigit() for m in middles) and (not padded or len({len(m) for m in middles}) == 1):
        numbers = [int(m) for m in middles]
        if numbers == list(range(numbers[0], numbers[0] + len(numbers))):
            return f"{head}{{{middles[0]}..{middles[-1]}}}{tail}"
    if all("," not in m and "/" not in m for m in middles):
        return f"{head}{{{','.join(middles)}}}{tail}"
    return None
