"""Compatibility with an end date: every old name or layout still read is listed with the release that removes it,
names code that exists, and is gone by that release."""

from __future__ import annotations

import importlib
import logging

import pytest

import alignclip
from alignclip.compat import DEPRECATIONS
from alignclip.compat.config import REMOVED_IN
from alignclip.config import load_config


def version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


@pytest.mark.parametrize("entry", DEPRECATIONS, ids=lambda e: e.where)
def test_each_entry_names_existing_code_and_is_not_overdue(entry):
    module, _, name = entry.where.rpartition(".")
    assert hasattr(importlib.import_module(module), name), f"{entry.where} does not exist: update DEPRECATIONS"
    assert version(entry.since) < version(entry.removed_in)
    assert version(alignclip.__version__) < version(entry.removed_in), (
        f"alignclip {alignclip.__version__} is the release that drops {entry.what!r}: remove {entry.where} and the "
        f"entry, and say so under 'Removed' in CHANGELOG.md")


def test_an_old_key_still_loads_and_the_warning_names_the_release_that_drops_it(caplog):
    with caplog.at_level(logging.WARNING, logger="alignclip.config"):
        config = load_config("experiment/embedded_default", ["train.lr=0.0123"])
    assert config.optim.lr == 0.0123
    assert f"accepted until alignclip {REMOVED_IN}" in caplog.text and "train.lr -> optim.lr" in caplog.text
