"""The command-line tools as a user runs them, but in process: a command's ``main(argv) -> int``, or a benchmark
script of ``tools/`` (benchmarks are not library code, so they are loaded from their file)."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from tests.helpers import REPO_ROOT


def command(name: str):
    """``main`` of ``alignclip.commands.<name>`` (the ``alignclip-<name>`` entry point)."""
    try:
        return importlib.import_module(f"alignclip.commands.{name}").main
    except ModuleNotFoundError as err:
        if err.name != f"alignclip.commands.{name}":
            raise
    # a tool still written as a script (tools/<name>.py with its main() under an ``if __name__`` guard)
    return script(name).main


def script(name: str) -> ModuleType:
    """``tools/<name>.py`` loaded as a module (its ``__main__`` block does not run)."""
    path = REPO_ROOT / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"tools_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
