"""Old config names and saved configs written before a key existed, mapped onto today's schema (each entry with
the release that removes it: ``alignclip.compat.DEPRECATIONS``). ``alignclip.config`` calls these while it loads;
nothing else reads old names."""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from alignclip.errors import ConfigError

REMOVED_IN = "0.3.0"  # the release that stops reading the old names and layouts below

# Keys that lived in ``train`` until the config was split by concern: still accepted (YAML files, command-line
# overrides, an older run directory's config.yaml), mapped onto their new place with one deprecation warning.
MOVED_KEYS: dict[str, str] = {
    **{f"train.{key}": f"optim.{key}" for key in ("lr", "warmup_steps", "min_lr", "weight_decay", "beta1", "beta2",
                                                   "eps", "grad_clip", "adamw_impl")},
    "train.checkpoint_every_steps": "checkpoint.every_steps", "train.keep_checkpoints": "checkpoint.keep",
    **{f"train.{key}": f"fast_path.{key}" for key in ("precision", "compile", "compile_mode", "sdpa",
                                                       "channels_last", "peak_tflops")},
}


def move_old_keys(raw: DictConfig, source: str, moved: list[str]) -> DictConfig:
    """Move the ``train.*`` keys of MOVED_KEYS in one YAML mapping onto their new section (in place); ``moved``
    collects ``old -> new``. Old and new spelling of one key in the same mapping is an error naming both."""
    train = raw.get("train") if isinstance(raw, DictConfig) else None
    if not isinstance(train, DictConfig):
        return raw
    for old, new in MOVED_KEYS.items():
        key, (section, name) = old.split(".", 1)[1], new.split(".")
        if key not in train:
            continue
        value = train.pop(key)
        if raw.get(section) is None:
            raw[section] = {}
        if name in raw[section]:
            raise ConfigError(f"{source}: both '{old}' (the old name) and '{new}' are set; keep '{new}'")
        raw[section][name] = value
        moved.append(f"{old} -> {new}")
    return raw


def warn_moved_keys(moved: list[str], source: str) -> None:
    """One deprecation warning per load, naming every old key used and its new name."""
    if moved:
        logging.getLogger("alignclip.config").warning(
            "deprecated config keys in %s (the train section was split into train / optim / checkpoint / "
            "fast_path): %s; accepted until alignclip %s, please rename", source, ", ".join(moved), REMOVED_IN)


def upgrade_saved_config(saved: DictConfig) -> DictConfig:
    """A resolved config dump (a run directory's config.yaml, an export's metadata) in today's layout: old names
    moved (one warning), and ``model.norm_eps`` null when the dump predates the key (the old mixed eps)."""
    moved: list[str] = []
    saved = move_old_keys(saved, "a saved config", moved)
    if "model" in saved and "norm_eps" not in saved.model:
        saved.model.norm_eps = None
    warn_moved_keys(moved, "a saved config (written before the train section was split)")
    return saved
