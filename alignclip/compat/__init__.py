"""Compatibility with an end date: every old name and old layout the package still reads, with the release that
removes it (docs/architecture.md, "Deprecation policy"; CHANGELOG.md lists each removal).

One module per concern holds the handling itself: ``compat.config`` (old config key names and saved configs
written before a key existed). Old checkpoint layouts are handled where checkpoints are read; ``DEPRECATIONS``
names each place, so that nothing old is kept without an owner. ``tests/test_arch_compat.py`` fails once the
package's version reaches an entry's ``removed_in``: the entry and its code then go.
"""

from __future__ import annotations

from dataclasses import dataclass

from alignclip.compat.config import REMOVED_IN


@dataclass(frozen=True)
class Deprecation:
    what: str  # the old name or layout still accepted
    where: str  # module.name that handles it
    since: str  # the release that introduced the new name or layout
    removed_in: str  # the first release that no longer accepts it


DEPRECATIONS: tuple[Deprecation, ...] = (
    # config names (alignclip/compat/config.py)
    Deprecation("train.{lr,warmup_steps,min_lr,weight_decay,beta1,beta2,eps,grad_clip,adamw_impl} -> optim.*, "
                "train.{checkpoint_every_steps,keep_checkpoints} -> checkpoint.*, "
                "train.{precision,compile,compile_mode,sdpa,channels_last,peak_tflops} -> fast_path.* "
                "(YAML, command line, saved config.yaml)", "alignclip.compat.config.MOVED_KEYS", "0.1.0", REMOVED_IN),
    Deprecation("a saved config without model.norm_eps: the mixed LayerNorm eps (1e-6 in the blocks, 1e-5 outside)",
                "alignclip.compat.config.upgrade_saved_config", "0.1.0", REMOVED_IN),
    Deprecation("resuming a run directory whose config.yaml lacks model.norm_eps keeps the mixed eps",
                "alignclip.config.with_saved_norm_eps", "0.1.0", REMOVED_IN),
    Deprecation("a config.yaml without optim.text_lr_scale trained without text groups (1.0)",
                "alignclip.config.saved_text_lr_scale", "0.1.0", REMOVED_IN),
    Deprecation("the mixed LayerNorm eps of models saved before model.norm_eps (norm_eps null)",
                "alignclip.models.factory.LEGACY_BLOCK_EPS", "0.1.0", REMOVED_IN),
    # checkpoint layouts (alignclip/training/checkpoint.py)
    Deprecation("checkpoints without manifest.json, with pickled rng_rank<R>.pt (numpy's tuple RNG state)",
                "alignclip.training.checkpoint.load_rng", "0.1.0", REMOVED_IN),
    Deprecation("trainer_state.json without text_lr_scale: read from the run directory's config.yaml",
                "alignclip.training.checkpoint.trained_text_lr_scale", "0.1.0", REMOVED_IN),
)
