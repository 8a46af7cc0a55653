"""Where the package finds the files it ships and where it keeps its caches.

``configs/`` and ``slurm/`` live at the top of the repository; ``alignclip/configs`` and ``alignclip/slurm`` are
symbolic links to them, so one lookup serves a checkout, an editable install and an installed wheel (the wheel
build follows the links and ships the files themselves, see ``[tool.setuptools.package-data]`` in pyproject.toml).
"""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent

#: the YAML recipes (``model/``, ``loss/``, ``experiment/``); config names like ``experiment/embedded_default``
#: resolve under it
CONFIG_DIR = (_PACKAGE_DIR / "configs").resolve()
#: the Slurm scripts and the default cluster environment ``env.sh``
SLURM_DIR = (_PACKAGE_DIR / "slurm").resolve()


def cache_dir(*parts: str) -> Path:
    """``$ALIGNCLIP_CACHE`` if set, else ``$XDG_CACHE_HOME/alignclip`` (``~/.cache/alignclip``), joined with
    ``parts``: the generated dataset and compiled extensions go there, never into the installed package."""
    root = os.environ.get("ALIGNCLIP_CACHE")
    if not root:
        root = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "alignclip")
    return Path(root).expanduser().joinpath(*parts)
