"""Record every read of a config key during a real training run started at its entry point (``alignclip.train.main``),
with the stack of modules that led to it: ``python -m tests.helpers.config_walk OUT.json key=value ...``.

Each dataclass section of ``alignclip.config`` is given a ``__getattribute__`` that notes the dotted key and the
caller's module stack (serialisation through OmegaConf, ``dataclasses`` and ``copy`` excluded: they read every
key and decide nothing). ``tests/test_arch_config_walk.py`` checks the walk against the import graph's floors.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from alignclip import config as schema



def sections(node=None, path: str = "") -> dict[type, str]:
    """Each section class of the schema -> its dotted path, found by walking a default ``Config``."""
    node = schema.Config() if node is None else node
    found = {type(node): path}
    for field in dataclasses.fields(node):
        value = getattr(node, field.name)
        if dataclasses.is_dataclass(value):
            found.update(sections(value, f"{path}.{field.name}".lstrip(".")))
    return found


IGNORED_CALLERS = ("dataclasses", "copy", "omegaconf")


def record(reads: list) -> None:
    """Install the recording ``__getattribute__`` on every section class; reads go into ``reads``."""
    for cls, section in sections().items():
        names = {f.name for f in dataclasses.fields(cls)}

        def getattribute(self, name, _names=names, _section=section):
            if name in _names:
                caller = sys._getframe(1)
                if not caller.f_globals.get("__name__", "").startswith(IGNORED_CALLERS):
                    stack, frame = [], caller
                    while frame is not None:
                        stack.append(frame.f_globals.get("__name__", "?"))
                        frame = frame.f_back
                    reads.append({"key": f"{_section}.{name}".lstrip("."), "stack": stack[::-1]})
            return object.__getattribute__(self, name)

        cls.__getattribute__ = getattribute


def main(argv: list[str]) -> int:
    out, overrides = argv[0], argv[1:]
    reads: list = []
    record(reads)
    from alignclip.train import main as train

    code = train(overrides)
    with open(out, "w") as f:
        json.dump({"exit": code, "reads": reads}, f)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
