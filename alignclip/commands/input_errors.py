"""Tool input errors as one line and exit code 2, never a traceback (the tools' shared convention)."""

from __future__ import annotations

import sys
from typing import Callable

# What a wrong path, format or file content raises in the library: the message names what was expected.
INPUT_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, ValueError, KeyError)


def run_reporting_input_errors(prog: str, body: Callable[[], int | None]) -> int:
    """``body()``'s exit code (0 for None); an input error -> ``prog: error: message`` on stderr and 2."""
    try:
        return body() or 0
    except INPUT_ERRORS as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"{prog}: error: {message}".splitlines()[0], file=sys.stderr)
        return 2
