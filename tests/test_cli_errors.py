"""User errors on the command line: exit code 2 and one line on stderr naming the problem, never a
traceback. Every case fails before a model is built or a step is trained."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from prefalign.cli import main

PREFALIGN = Path(sys.executable).with_name("prefalign")  # the console script of this venv


def write(tmp_path: Path, text: str, name: str = "bad.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def run_cli(capsys, *argv: str) -> str:
    """Run `prefalign *argv` in-process; assert it is a user error and return its one stderr line."""
    code = main(list(argv))
    captured = capsys.readouterr()
    assert code == 2, captured
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def test_unknown_key_in_config_file(tmp_path, capsys):
    path = write(tmp_path, "model:\n  name_or_path: some/model\ntrainer:\n  lrr: 0.1\n")
    line = run_cli(capsys, "sft", "--config", str(path))
    assert line.startswith("prefalign sft: error: unknown config key 'trainer.lrr', allowed keys in trainer: ")
    assert "batch_size" in line and "schedule" in line and ", lr, " in line


def test_unknown_top_level_key(tmp_path, capsys):
    path = write(tmp_path, "modle:\n  name_or_path: x\n")
    assert run_cli(capsys, "sft", "--config", str(path)) == (
        "prefalign sft: error: unknown config key 'modle', allowed keys: data, model, trainer"
    )


def test_bad_literal_override(tmp_path, capsys):
    path = write(tmp_path, "model:\n  name_or_path: x\n", name="ok.yaml")
    assert run_cli(capsys, "sft", "--config", str(path), "trainer.schedule=cosin") == (
        "prefalign sft: error: config key 'trainer.schedule': got 'cosin', allowed: 'constant', 'linear', 'cosine'"
    )


def test_bad_literal_in_file(tmp_path, capsys):
    path = write(tmp_path, "data:\n  truncation: middle\n")
    assert run_cli(capsys, "sft", "--config", str(path)) == (
        "prefalign sft: error: config key 'data.truncation': got 'middle', allowed: 'keep_end', 'keep_start'"
    )


def test_wrong_type_override(capsys):
    assert run_cli(capsys, "sft", "trainer.batch_size=eight") == (
        "prefalign sft: error: config key 'trainer.batch_size': expected an integer, got 'eight'"
    )


def test_missing_config_file(tmp_path, capsys):
    missing = tmp_path / "missing.yaml"
    assert run_cli(capsys, "sft", "--config", str(missing)) == (
        f"prefalign sft: error: config file {missing} does not exist"
    )


def test_invalid_yaml_names_the_line(tmp_path, capsys):
    path = write(tmp_path, "model:\n  name_or_path: x\ntrainer: [1, 2\n")
    line = run_cli(capsys, "sft", "--config", str(path))
    assert re.match(rf"^prefalign sft: error: {re.escape(str(path))}:\d+: not valid YAML \(", line), line


def test_override_without_equals_sign(capsys):
    line = run_cli(capsys, "sft", "trainer.lr", "model.name_or_path=x")
    assert line.startswith("prefalign sft: error: override 'trainer.lr' must look like key=value")


@pytest.mark.parametrize(
    ("overrides", "key"),
    [([], "model.name_or_path"), (["model.name_or_path=some/model"], "data.path")],
)
def test_required_keys(capsys, overrides, key):
    line = run_cli(capsys, "sft", *overrides)
    assert line.startswith(f"prefalign sft: error: config key '{key}' is required")


@pytest.mark.parametrize("command", [["rest"], ["discover"], ["arm", "train"], ["rm", "train"]])
def test_every_config_command_rejects_an_unknown_key(capsys, command):
    line = run_cli(capsys, *command, "no_such_section.key=1")
    assert line.startswith(f"prefalign {' '.join(command)}: error: unknown config key 'no_such_section'"), line


def test_train_config_errors(tmp_path, capsys):
    """`train` (implemented in issue 3) checks its config before it loads anything."""
    assert run_cli(capsys, "train", "trainer.schedule=cosin").endswith(
        "error: config key 'trainer.schedule': got 'cosin', allowed: 'constant', 'linear', 'cosine'"
    )
    path = write(tmp_path, "trainer:\n  lrr: 1\n")
    assert run_cli(capsys, "train", "--config", str(path)).startswith(
        "prefalign train: error: unknown config key 'trainer.lrr', allowed keys in trainer: "
    )
    assert run_cli(capsys, "train", "--config", str(tmp_path / "none.yaml")) == (
        f"prefalign train: error: config file {tmp_path / 'none.yaml'} does not exist"
    )


def test_unknown_flag_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["sft", "--no-such-flag"])
    assert info.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def run_console_script(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    assert PREFALIGN.exists(), f"console script {PREFALIGN} is not installed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(
        [str(PREFALIGN), *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.slow  # a fresh interpreter imports torch: 4 s
def test_console_script_unknown_key_exits_2_with_one_line(tmp_path):
    path = write(tmp_path, "trainer:\n  schedule: cosine\n  lrr: 0.1\n")
    result = run_console_script("sft", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 2, result
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("prefalign sft: error: unknown config key 'trainer.lrr', allowed keys in trainer: ")
