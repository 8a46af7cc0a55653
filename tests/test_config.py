import subprocess
import sys

import pytest

from alignclip.config import (CONFIG_DIR, REPO_ROOT, Config, ConfigError, config_hash, from_yaml_text, load_config,
                              save_config, to_yaml)


def test_schema_defaults_are_the_paper_recipe():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert (cfg.train.lr, cfg.train.warmup_steps, cfg.train.weight_decay, cfg.train.global_batch_size) == \
        (1e-3, 10_000, 0.1, 512)
    assert cfg.model.init_temperature == 0.07 and cfg.model.vision.patch_size == 16


def test_yaml_overrides_defaults_and_cli_overrides_yaml(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  lr: 0.5\n  epochs: 3\nmodel:\n  embed_dim: 32\n")
    cfg = load_config(path, ["train.lr=0.25"])
    assert cfg.train.lr == 0.25  # command line beats the file
    assert cfg.train.epochs == 3  # the file beats the schema
    assert cfg.model.embed_dim == 32
    assert cfg.train.weight_decay == 0.1  # untouched schema default


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
    cfg = load_config("model/alignclip_tiny", ["train.lr=0.01"])
    written = save_config(cfg, tmp_path / "run")
    again = from_yaml_text(written.read_text())
    assert again == cfg and config_hash(again) == config_hash(cfg)
    assert config_hash(load_config("model/alignclip_tiny")) != config_hash(cfg)


def test_every_shipped_config_loads():
    paths = sorted(CONFIG_DIR.rglob("*.yaml"))
    assert len(paths) >= 7
    for path in paths:
        if path.parent.name == "study":  # study files (alignclip-study), not training configs
            from alignclip.study.spec import load_study

            load_study(path)
            continue
        load_config(path)  # raises on any error
        assert to_yaml(load_config(path))
