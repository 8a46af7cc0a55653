"""One way in per command: every console script answers a config or input error with one line on stderr and exit
code 2 (the one boundary, alignclip.errors.run_command), and library code never leaves the process itself."""

from __future__ import annotations

import ast
import importlib
import tomllib
from pathlib import Path

import pytest

import alignclip

PACKAGE = Path(alignclip.__file__).parent
ROOT = PACKAGE.parent


def scripts() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def bad_argv(tmp: Path) -> dict[str, list[str]]:
    """Per console script, a command line with a wrong key or a missing input."""
    missing = str(tmp / "missing")
    return {
        "alignclip-train": ["--config", "experiment/embedded_default", "optim.lrr=1"],
        "alignclip-run-default": ["optim.lrr=1"],
        "alignclip-embed-captions": [missing + ".tar", "--out", str(tmp / "sem")],
        "alignclip-sweep": ["--config", "experiment/embedded_default", "--grid", "optim.lrr=1,2", "--dry-run"],
        "alignclip-make-shards": ["validate", missing],
        "alignclip-export": [missing, str(tmp / "out.safetensors")],
        "alignclip-eval": ["--model", missing + ".safetensors", "--out", str(tmp / "eval")],
        "alignclip-gap": ["--model", f"a={missing}.safetensors", "--out", str(tmp / "gap")],
        "alignclip-distill": ["--fit", missing + ".safetensors", "--eval", missing + ".npy", "--out", str(tmp / "d")],
        "alignclip-study": [missing + ".yaml"],
    }


def test_every_console_script_is_covered(tmp_path):
    assert set(scripts()) == set(bad_argv(tmp_path))


@pytest.mark.parametrize("name", sorted(scripts()))
def test_an_input_error_is_one_line_and_exit_2(name, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module, _, attr = scripts()[name].partition(":")
    entry = getattr(importlib.import_module(module), attr)
    argv = bad_argv(tmp_path)[name]
    if attr == "cli":  # alignclip-train: cli() leaves through os._exit; main is its body
        entry = importlib.import_module(module).main
    assert entry(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(name + ": ") and "Traceback" not in err[0], err
    assert "lrr" in err[0] or "missing" in err[0], err


def main_guard(node: ast.AST) -> bool:
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def test_library_code_never_exits():
    """No ``raise SystemExit`` / ``sys.exit`` outside ``if __name__ == "__main__":`` and ``__main__.py`` (the
    ``python -m`` ways in)."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "__main__.py":
            continue
        tree = ast.parse(path.read_text(), str(path))
        guarded = {id(n) for top in tree.body if main_guard(top) for n in ast.walk(top)}
        for node in ast.walk(tree):
            if id(node) in guarded:
                continue
            exc = node.exc.func if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) else \
                getattr(node, "exc", None) if isinstance(node, ast.Raise) else None
            if isinstance(exc, ast.Name) and exc.id == "SystemExit":
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} raise SystemExit")
            if isinstance(node, ast.Attribute) and node.attr == "exit" and getattr(node.value, "id", "") == "sys":
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} sys.exit")
    assert not found, f"leave through the entry point's return code instead: {found}"


def test_the_library_takes_no_argparse_objects():
    """argparse lives in the commands and the entry functions; no library function reads an argparse Namespace."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "commands":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and node.attr == "Namespace":
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name not in ("main", "_run"):
                if any(a.arg == "args" for a in node.args.args):
                    found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}(args)")
    assert not found, found
