"""Configs as the code before the split of the train section wrote them (for the compatibility tests)."""

from __future__ import annotations


NEWER_KEYS = ("optim.text_lr_scale",)


def to_old_layout(text: str) -> str:
    """A resolved config dump as the code before the split wrote it: optim / checkpoint / fast_path keys in train."""
    from omegaconf import OmegaConf

    from alignclip.compat.config import MOVED_KEYS

    raw = OmegaConf.to_container(OmegaConf.create(text))
    for key in NEWER_KEYS:  # keys added after the split: an old dump never had them (their defaults apply)
        section, name = key.split(".")
        raw[section].pop(name)
    for old, new in MOVED_KEYS.items():
        section, name = new.split(".")
        raw["train"][old.split(".")[1]] = raw[section].pop(name)
    for section in ("optim", "checkpoint", "fast_path"):
        assert not raw.pop(section)
    return OmegaConf.to_yaml(OmegaConf.create(raw))
