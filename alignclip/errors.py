"""The error types a command turns into one line and exit code 2 (``alignclip.commands.boundary``). Standard
library only, at the bottom of the import graph: every layer may raise them."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration problem; the message names the key and, where known, the file."""
