"""The error types every entry point reports as one line and exit code 2, and the one boundary that does it.

Library code raises (``ConfigError`` naming the key and file, or a built-in input error naming the path); it never
prints the message nor leaves the process. Every way in (the ``alignclip-*`` console scripts and the ``python -m``
mains that share their ``main``) runs its body through ``run_command``, which turns those errors into
``PROG: config error: ...`` / ``PROG: error: ...`` on stderr and exit code 2, without a traceback. Standard library
only, at the bottom of the import graph: every layer may raise these types.
"""

from __future__ import annotations

import sys
from typing import Callable


class ConfigError(ValueError):
    """A configuration problem; the message names the key and, where known, the file."""

    kind = "config error"  # how run_command labels it
    listing = False  # True: the lines after the first list the causes, and run_command prints them too


# The modules of the ``train`` extra (pyproject.toml): a command that needs one says which extra to install.
TRAIN_EXTRA = ("deepspeed", "sentence_transformers", "submitit", "tensorboard")

# What a wrong path, format or file content raises in the library: the message names what was expected.
INPUT_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, ValueError, KeyError)


def run_command(prog: str, body: Callable[[], int | None],
                errors: tuple[type[Exception], ...] = INPUT_ERRORS) -> int:
    """``body()``'s exit code (0 for None); a ``ConfigError`` or an input error -> one line on stderr and 2, as is
    a missing module of the ``train`` extra (the line says what to install). The line is the message's first; an
    error whose ``listing`` is true (every checkpoint that failed to verify) keeps its list below it.

    ``errors``: what counts as the user's input; a command whose body runs long computations (training) passes
    ``(ConfigError,)`` alone, so that a ValueError from a bug keeps its traceback."""
    try:
        return body() or 0
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] not in TRAIN_EXTRA:
            raise
        line = f"{prog}: error: {err}: this needs the training stack, pip install 'alignclip[train]'"
    except errors as err:  # ConfigError is a ValueError
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        line = f"{prog}: {getattr(err, 'kind', 'error')}: {message}"
        if not getattr(err, "listing", False):
            line = line.splitlines()[0]
    print(line, file=sys.stderr)
    return 2
