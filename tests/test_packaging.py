"""The package stands on its own: the library imports nothing from ``tools/`` or ``tests/``; config names resolve
from any folder; a wheel built from the repository installs into a fresh environment and trains the embedded default
from a folder that is not the checkout, with the configs and ``env.sh`` it ships."""

from __future__ import annotations

import ast
import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from alignclip.config import load_config, resolve_config_path
from alignclip.paths import CONFIG_DIR, cache_dir
from tests.helpers import REPO_ROOT

FORBIDDEN = ("tools", "tests")


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            roots.add(str(node.args[0].value).split(".")[0])
    return roots


def test_no_library_source_imports_tools_or_tests():
    sources = sorted((REPO_ROOT / "alignclip").rglob("*.py"))
    assert len(sources) > 30
    offenders = {str(p.relative_to(REPO_ROOT)): sorted(_imported_roots(p) & set(FORBIDDEN)) for p in sources}
    assert {k: v for k, v in offenders.items() if v} == {}


_IMPORT_EVERY_MODULE = r"""
import importlib, json, pkgutil, sys
import alignclip
names = [m.name for m in pkgutil.walk_packages(alignclip.__path__, "alignclip.") if not m.name.endswith("__main__")]
for name in names:
    importlib.import_module(name)
print(json.dumps({"file": alignclip.__file__, "modules": names,
                  "leaked": sorted(n for n in sys.modules if n.split(".")[0] in ("tools", "tests"))}))
"""


@pytest.mark.heavy
def test_every_library_module_imports_with_only_the_package_on_the_path(tmp_path):
    """Only ``alignclip/`` is importable (a folder holding a link to it), so an import of ``tools`` or ``tests``
    anywhere in the library, even a lazy one at module level, fails here."""
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    (site_dir / "alignclip").symlink_to(REPO_ROOT / "alignclip", target_is_directory=True)
    env = dict(os.environ, PYTHONPATH=str(site_dir))
    proc = subprocess.run([sys.executable, "-c", _IMPORT_EVERY_MODULE], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["file"].startswith(str(site_dir))
    assert "alignclip.config" in report["modules"] and "alignclip.commands.sweep" in report["modules"]
    assert report["leaked"] == []


def test_config_names_resolve_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the checkout: everything below comes from the shipped configs
    expected = CONFIG_DIR / "experiment" / "embedded_default.yaml"
    for name in ("experiment/embedded_default", "experiment/embedded_default.yaml",
                 "configs/experiment/embedded_default.yaml", str(expected)):
        assert resolve_config_path(name) == expected, name
    assert load_config("configs/experiment/embedded_default.yaml").name == "embedded_default"  # its defaults: chain
    local = tmp_path / "configs" / "experiment" / "embedded_default.yaml"  # a user's own file wins over ours
    local.parent.mkdir(parents=True)
    local.write_text(f"defaults: [{expected}]\nname: mine\n")
    assert resolve_config_path("configs/experiment/embedded_default.yaml") == Path("configs/experiment/"
                                                                                    "embedded_default.yaml")
    assert load_config("configs/experiment/embedded_default.yaml").name == "mine"
    with pytest.raises(Exception, match="config file not found: experiment/nope"):
        resolve_config_path("experiment/nope")


def test_cache_dir_follows_alignclip_cache_then_xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNCLIP_CACHE", str(tmp_path / "mine"))
    assert cache_dir("generated") == tmp_path / "mine" / "generated"
    monkeypatch.delenv("ALIGNCLIP_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "alignclip"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir("torch_extensions") == Path.home() / ".cache" / "alignclip" / "torch_extensions"


# ------------------------------------------------------------------------------------ the installed wheel
def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, f"{cmd[:4]} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


_INSPECT_INSTALL = r"""
import importlib.metadata as md, json, re
import alignclip
from alignclip.config import load_config
from alignclip.launch import DEFAULT_ENV_FILE
from alignclip.paths import CONFIG_DIR
missing = []
for req in md.requires("alignclip"):
    if "extra ==" not in req:
        name = re.match(r"[A-Za-z0-9_.\-]+", req).group(0)
        try:
            md.version(name)
        except md.PackageNotFoundError:
            missing.append(req)
print(json.dumps({"file": alignclip.__file__, "configs": str(CONFIG_DIR), "env_file": str(DEFAULT_ENV_FILE),
                  "env_file_exists": DEFAULT_ENV_FILE.is_file(), "missing": missing,
                  "experiments": sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml")),
                  "clip": load_config("configs/experiment/embedded_clip.yaml").model.arch}))
"""


@pytest.mark.heavy
def test_wheel_trains_the_embedded_default_outside_the_checkout(tmp_path):
    """Build a wheel from a clean copy of the repository, install it into a new virtual environment, and train the
    embedded default at a toy size with ``alignclip-run-default`` from a folder where the checkout is not
    importable (no PYTHONPATH). The new environment sees the test environment's dependencies through a path line
    (torch is not installed twice); a plain path line runs none of that environment's ``.pth`` hooks, so its own
    (editable) alignclip stays invisible."""
    source = tmp_path / "source"
    top_level_scratch = {".git", ".venv", "build", "dist", "runs", "data", ".cache", ".pytest_cache", "tests"}
    shutil.copytree(REPO_ROOT, source, symlinks=True, ignore=lambda folder, names: [
        n for n in names if n == "__pycache__" or n.endswith(".egg-info")
        or (Path(folder) == REPO_ROOT and n in top_level_scratch)])
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", source, "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", dist], cwd=tmp_path, timeout=600)
    (wheel,) = dist.glob("alignclip-*.whl")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], timeout=300)
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel],
         timeout=600)
    purelib = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        timeout=60).stdout.strip())
    (purelib / "test-dependencies.pth").write_text("".join(f"{p}\n" for p in site.getsitepackages()))

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", ALIGNCLIP_CACHE=str(tmp_path / "cache"),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)

    installed = json.loads(_run([python, "-c", _INSPECT_INSTALL], cwd=elsewhere, env=env,
                                timeout=300).stdout.strip().splitlines()[-1])
    assert installed["file"] == str(purelib / "alignclip" / "__init__.py")
    assert installed["configs"] == str(purelib / "alignclip" / "configs")
    assert installed["env_file"] == str(purelib / "alignclip" / "slurm" / "env.sh") and installed["env_file_exists"]
    assert {"embedded_default", "embedded_clip", "cc12m_alignclip"} <= set(installed["experiments"])
    assert installed["clip"] == "clip" and installed["missing"] == []
    for command in ("alignclip-train", "alignclip-sweep", "alignclip-embed-captions"):
        assert "usage:" in _run([bin_dir / command, "--help"], cwd=elsewhere, env=env, timeout=300).stdout

    out_dir = elsewhere / "embedded"
    overrides = ["data.workers=0", "data.generated.num_shards=2",
                 "data.generated.samples_per_shard=64", "data.generated.val_samples=64", "train.global_batch_size=32",
                 "train.max_steps=3", "optim.warmup_steps=1", "logging.gap_batch_size=32", "logging.progress_bar=false",
                 "model.vision.width=32", "model.vision.layers=1", "model.text.width=32", "model.text.layers=1",
                 "model.embed_dim=32"]
    out = _run([bin_dir / "alignclip-run-default", "--out", str(out_dir), *overrides], cwd=elsewhere, env=env,
               timeout=900).stdout
    for model in ("clip", "alignclip"):  # make run trains both and prints them side by side
        assert (out_dir / model / "checkpoints" / "step_00000003" / "trainer_state.json").is_file()
    assert "alignment (mean paired cosine" in out and "zero-shot colour" in out
    assert list((tmp_path / "cache" / "generated").glob("*/train-00000.tar"))  # the default data folder
    assert not list((purelib / "alignclip").rglob("*.tar"))  # nothing was written into the installed package
