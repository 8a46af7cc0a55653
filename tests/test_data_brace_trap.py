"""The brace trap: bash expands an unquoted ``data.train=/d/{00000..00003}.tar`` into four ``data.train=`` words.
Every entry point that takes users' overrides (the trainer, the config printer, the sbatch path's
``launch shell-env``, submitit's ``launch submit`` and sweeps) refuses a repeated key with exit code 2 and, when
the values look like one expanded pattern, says to quote it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from alignclip import launch
from alignclip.config import ConfigError, check_repeated_overrides
from alignclip.braces import brace_pattern_of, expand_braces

PATTERN = "/data/cc12m/{00000..00003}.tar"


def _bash(command: str) -> subprocess.CompletedProcess:
    """Run through bash, unquoted, as a user's command line is: bash does the expansion, not the test."""
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ), cwd=os.getcwd())


@pytest.mark.parametrize("module", ["alignclip.train", "alignclip.config",
                                    "alignclip.launch shell-env --config experiment/embedded_default"])
def test_an_expanded_pattern_on_the_command_line_exits_2_with_the_quoting_hint(module):
    result = _bash(f"{sys.executable} -m {module} data.train={PATTERN} train.max_steps=1")
    assert result.returncode == 2, result.stderr
    assert "'data.train' is given 4 times" in result.stderr
    assert f"quote it, data.train='{PATTERN}'" in result.stderr
    assert "Traceback" not in result.stderr


def test_submitit_submission_refuses_before_submitting(tmp_path, capsys):
    assert launch.main(["submit", "--config", "experiment/embedded_default", "--executor", "local",
                        f"output_dir={tmp_path}", *expand_braces(f"data.train={PATTERN}")]) == 2
    assert f"data.train='{PATTERN}'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing submitted, no run directory made


def test_sweeps_check_the_base_and_each_point():
    with pytest.raises(ConfigError, match="quote it"):
        launch.make_sweep("experiment/embedded_default", [["optim.lr=0.1"]], expand_braces(f"data.train={PATTERN}"))
    with pytest.raises(ConfigError, match="'optim.lr' is given 2 times"):
        launch.make_sweep("experiment/embedded_default", [["optim.lr=0.1", "optim.lr=0.2"]])


def test_any_repeated_key_is_an_error_but_the_launchers_run_dir_is_not():
    with pytest.raises(ConfigError, match=r"'train.max_steps' is given 2 times .*give it once"):
        check_repeated_overrides(["train.max_steps=1", "train.max_steps=2"])
    check_repeated_overrides(["run_dir=runs/a", "optim.lr=0.1", "run_dir=/abs/runs/a"])  # appended by launchers
    # an old name and its new one set the same key (the old train.* names still load)
    with pytest.raises(ConfigError, match=r"'optim.lr' is given 2 times .*spelled \['optim.lr', 'train.lr'\]"):
        check_repeated_overrides(["train.lr=1", "optim.lr=2"])


def test_a_sweep_point_replaces_the_base_key_under_either_name(tmp_path):
    _, runs = launch.make_sweep("experiment/embedded_default", [["optim.lr=0.2"]], ["train.lr=0.1"],
                                sweep_dir=tmp_path)
    assert runs[0].config.optim.lr == 0.2


@pytest.mark.parametrize("pattern", [PATTERN, "s3://b/cc/{000..011}.tar", "x/{8..12}.tar", "/d/{a,b,c}/shard.tar"])
def test_brace_pattern_of_inverts_the_expansion(pattern):
    assert brace_pattern_of(expand_braces(pattern)) == pattern


def test_values_that_are_no_pattern_get_no_pattern():
    assert brace_pattern_of(["1", "2"]) is None  # nothing around them: no hint
    assert brace_pattern_of(["a/x.tar", "a/x.tar"]) is None
    assert brace_pattern_of(["only.tar"]) is None
