import subprocess
import sys

import pytest

from alignclip.config import (CONFIG_DIR, Config, ConfigError, config_hash, from_yaml_text, load_config,
                              save_config, to_yaml)
from tests.helpers import REPO_ROOT
from tests.helpers.old_configs import to_old_layout


def test_schema_defaults_are_the_paper_recipe():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.weight_decay, cfg.train.global_batch_size) == \
        (1e-3, 10_000, 0.1, 512)
    assert cfg.model.init_temperature == 0.07 and cfg.model.vision.patch_size == 16


def test_yaml_overrides_defaults_and_cli_overrides_yaml(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  epochs: 3\noptim:\n  lr: 0.5\nmodel:\n  embed_dim: 32\n")
    cfg = load_config(path, ["optim.lr=0.25"])
    assert cfg.optim.lr == 0.25  # command line beats the file
    assert cfg.train.epochs == 3  # the file beats the schema
    assert cfg.model.embed_dim == 32
    assert cfg.optim.weight_decay == 0.1  # untouched schema default


def test_defaults_chain_is_merged_parent_first():
    cfg = load_config("model/alignclip_tiny")
    assert cfg.model.arch == "sharedclip"  # from sharedclip_tiny
    assert cfg.model.vision.width == 64  # from clip_tiny, two levels up
    assert (cfg.loss.crsep_weight, cfg.loss.imsep_weight, cfg.loss.clip_weight) == (1.0, 0.5, 0.0)


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "learning_rate" in str(err.value) and str(path) in str(err.value)


def test_wrong_type_names_key():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.epochs=many"])
    assert "train.epochs" in str(err.value)


def test_unknown_override_key_is_an_error():
    with pytest.raises(ConfigError, match="train.lrr"):
        load_config(None, ["train.lrr=1"])


def test_invalid_choice_and_shared_shape_mismatch_name_the_key():
    with pytest.raises(ConfigError, match="model.arch"):
        load_config(None, ["model.arch=vit"])
    with pytest.raises(ConfigError, match="model.vision.width"):
        load_config("model/sharedclip_tiny", ["model.text.width=32"])


def test_command_line_error_exits_with_code_2():
    proc = subprocess.run([sys.executable, "-m", "alignclip.config", "--config", "model/clip_tiny",
                           "train.nonsense=1"], capture_output=True, text=True, cwd=REPO_ROOT)
    assert proc.returncode == 2
    assert "train.nonsense" in proc.stderr


def test_resolved_config_round_trips_through_run_dir(tmp_path):
    cfg = load_config("model/alignclip_tiny", ["optim.lr=0.01"])
    written = save_config(cfg, tmp_path / "run")
    again = from_yaml_text(written.read_text())
    assert again == cfg and config_hash(again) == config_hash(cfg)
    assert config_hash(load_config("model/alignclip_tiny")) != config_hash(cfg)


def test_every_shipped_config_loads():
    from alignclip.study.spec import load_study

    paths = sorted(CONFIG_DIR.rglob("*.yaml"))
    studies = [p for p in paths if p.parent.name == "study"]  # study grids, with a schema of their own
    assert len(paths) - len(studies) >= 7 and studies
    for path in paths:
        if path in studies:
            assert load_study(path).variants  # raises on any error, including each variant's training config
            continue
        load_config(path)  # raises on any error
        assert to_yaml(load_config(path))


# ------------------------------------------------------------------------------------------ range checks
def _numeric_keys(node=Config, prefix: str = "") -> list[str]:
    """The dotted names of the schema's int and float fields."""
    import dataclasses
    import typing

    keys = []
    for name, kind in typing.get_type_hints(node).items():
        if dataclasses.is_dataclass(kind):
            keys += _numeric_keys(kind, f"{prefix}{name}.")
        elif kind in (int, float):
            keys.append(prefix + name)
    return keys


def test_every_numeric_key_has_a_range_check():
    from alignclip.config import CHOICES, RANGES

    keys = _numeric_keys()
    assert len(keys) > 50 and "model.vision.patch_size" in keys and "optim.lr" in keys
    assert sorted(set(keys) - set(RANGES) - set(CHOICES)) == []  # a new numeric key needs its range (or choices)
    assert sorted(set(RANGES) - set(keys)) == []  # and the table names no key that does not exist


@pytest.mark.parametrize("override, allowed", [
    ("model.vision.patch_size=0", "> 0"),
    ("model.vision.heads=0", "> 0"),  # once a ZeroDivisionError inside validation
    ("model.text.heads=-2", "> 0"),
    ("model.text.context_length=0", ">= 2"),
    ("model.embed_dim=0", "> 0"),
    ("optim.lr=-0.001", "> 0"),
    ("optim.lr=nan", "finite"),
    ("optim.lr=inf", "finite"),
    ("optim.beta1=1.0", "< 1"),
    ("optim.beta2=1.5", "< 1"),
    ("optim.eps=0", "> 0"),
    ("checkpoint.every_steps=-1", ">= 0"),  # once silently disabled checkpoints
    ("checkpoint.keep=0", ">= 1"),
    ("train.epochs=0", "> 0"),  # once exit 0 with nothing done
    ("train.global_batch_size=0", "> 0"),
    ("train.micro_batch_size=-4", ">= 0"),
    ("optim.warmup_steps=-1", ">= 0"),
    ("train.max_skipped_steps=-1", ">= 0"),
    ("loss.imsep_weight=-0.5", ">= 0"),
    ("loss.chunk_size=0", "> 0"),
    ("loss.imsep_start_step=-1", ">= 0"),
    ("data.workers=-1", ">= 0"),
    ("logging.gap_batch_size=0", "> 0"),
    ("launch.nodes=0", "> 0"),
])
def test_out_of_range_values_name_the_key_and_what_is_allowed(override, allowed):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as err:
        load_config("model/clip_tiny", [override])
    assert f"key '{key}'" in str(err.value) and allowed in str(err.value), str(err.value)


def test_width_not_divisible_by_heads_and_min_lr_above_lr_are_refused():
    with pytest.raises(ConfigError, match="'model.vision.width' .* divisible by 'model.vision.heads'"):
        load_config("model/clip_tiny", ["model.vision.heads=5"])
    with pytest.raises(ConfigError, match="'optim.min_lr'"):
        load_config(None, ["optim.lr=1e-4", "optim.min_lr=1e-3"])


def test_conv_stem_needs_a_power_of_two_patch_and_an_unknown_stem_is_named():
    assert load_config("model/clip_tiny", ["model.vision.stem=conv"]).model.vision.stem == "conv"
    with pytest.raises(ConfigError, match="'model.vision.patch_size' .* power of two .*'model.vision.stem'"):
        load_config("model/clip_tiny", ["model.vision.stem=conv", "model.vision.image_size=60",
                                         "model.vision.patch_size=6"])
    with pytest.raises(ConfigError, match="key 'model.vision.stem' is 'resnet'"):
        load_config("model/clip_tiny", ["model.vision.stem=resnet"])


def test_hybrid_stem_needs_a_patch_of_a_multiple_of_4_and_no_stem_channels():
    assert load_config("model/clip_tiny", ["model.vision.stem=hybrid"]).model.vision.stem == "hybrid"
    with pytest.raises(ConfigError, match="'model.vision.patch_size' .* multiple of 4 .*'model.vision.stem'"):
        load_config("model/clip_tiny", ["model.vision.stem=hybrid", "model.vision.image_size=60",
                                         "model.vision.patch_size=6"])
    with pytest.raises(ConfigError, match="'model.vision.stem_channels' .* 'conv' stem only"):
        load_config("model/clip_tiny", ["model.vision.stem=hybrid", "model.vision.stem_channels=128"])


def test_out_of_range_value_exits_2_before_anything_is_built(tmp_path):
    """The trainer's entry point: exit 2 naming the key, and no run directory made."""
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "alignclip.train", "--config", "model/clip_tiny",
                           f"run_dir={run_dir}", "model.vision.patch_size=0"], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=300)
    assert proc.returncode == 2 and "model.vision.patch_size" in proc.stderr and "Traceback" not in proc.stderr
    assert not run_dir.exists()


# ------------------------------------------------------------------------------- the train section, split
OLD_LAYOUT = """train:
  epochs: 2
  lr: 0.25
  grad_clip: 0.5
  precision: fp32
  compile: false
  checkpoint_every_steps: 7
  keep_checkpoints: 4
"""


def test_old_train_keys_in_a_file_map_onto_the_new_sections_with_one_warning(tmp_path, caplog):
    path = tmp_path / "old.yaml"
    path.write_text(OLD_LAYOUT)
    with caplog.at_level("WARNING", logger="alignclip.config"):
        cfg = load_config(path)
    assert (cfg.train.epochs, cfg.optim.lr, cfg.optim.grad_clip) == (2, 0.25, 0.5)
    assert (cfg.fast_path.precision, cfg.fast_path.compile) == ("fp32", False)
    assert (cfg.checkpoint.every_steps, cfg.checkpoint.keep) == (7, 4)
    warnings = [r.getMessage() for r in caplog.records if r.name == "alignclip.config"]
    assert len(warnings) == 1 and str(path) in warnings[0]
    for old, new in [("train.lr", "optim.lr"), ("train.precision", "fast_path.precision"),
                     ("train.checkpoint_every_steps", "checkpoint.every_steps")]:
        assert f"{old} -> {new}" in warnings[0]


def test_old_train_keys_on_the_command_line_are_mapped_and_named(caplog):
    with caplog.at_level("WARNING", logger="alignclip.config"):
        cfg = load_config("model/clip_tiny", ["train.lr=0.125", "train.keep_checkpoints=5", "train.epochs=3"])
    assert (cfg.optim.lr, cfg.checkpoint.keep, cfg.train.epochs) == (0.125, 5, 3)
    warnings = [r.getMessage() for r in caplog.records if r.name == "alignclip.config"]
    assert len(warnings) == 1 and "train.lr -> optim.lr" in warnings[0] and "train.keep_checkpoints" in warnings[0]
    with pytest.raises(ConfigError, match="'optim.lr'"):  # range checks name the new key
        load_config(None, ["train.lr=-1"])


def test_old_and_new_name_of_one_key_in_a_file_is_an_error(tmp_path):
    path = tmp_path / "both.yaml"
    path.write_text("train:\n  lr: 0.1\noptim:\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match="both 'train.lr'.*'optim.lr'"):
        load_config(path)


def test_an_old_run_directory_config_reads_back(tmp_path, caplog):
    """A config.yaml written before the split: every key lands in its new place, nothing else changes."""
    new = load_config("model/clip_tiny", ["optim.lr=0.03", "checkpoint.every_steps=9", "fast_path.sdpa=false"])
    old_text = to_old_layout(to_yaml(new))
    assert "optim:" not in old_text and "  lr: 0.03" in old_text
    with caplog.at_level("WARNING", logger="alignclip.config"):
        assert from_yaml_text(old_text) == new
        path = tmp_path / "config.yaml"
        path.write_text(old_text)
        assert load_config(path) == new
    assert any("train.sdpa -> fast_path.sdpa" in r.getMessage() for r in caplog.records)
