"""--resume and checkpoints that cannot be resumed: one line naming the directory or file, exit
code 2, never a fresh run started silently nor a bare Errno message."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import build_tiny_tokenizer, save_tiny_llama
from test_cli_errors import run_cli

from prefalign.cli import COMMANDS, main

# Every command with --resume, and the config key of its run directory.
RESUMABLE = {
    ("train",): "trainer.out_dir",
    ("sft",): "trainer.out_dir",
    ("rm", "train"): "trainer.out_dir",
    ("arm", "train"): "trainer.out_dir",
    ("rest",): "out_dir",
    ("discover",): "out_dir",
}


def test_the_table_names_every_resumable_command():
    assert {tuple(c.name.split()) for c in COMMANDS if c.schema} == set(RESUMABLE)


@pytest.mark.parametrize("command", list(RESUMABLE), ids=" ".join)
def test_resume_of_a_missing_out_dir_is_refused_naming_it(tmp_path, capsys, command):
    out_dir = tmp_path / "typo"
    key = RESUMABLE[command]
    line = run_cli(capsys, *command, "--resume", f"{key}={out_dir}")
    assert f"out_dir {out_dir} (config key '{key}') does not exist" in line
    assert line.startswith(f"prefalign {' '.join(command)}: error: --resume: ")
    assert not out_dir.exists()  # nothing was started there


@pytest.mark.parametrize("command", [("train",), ("rest",)], ids=" ".join)
def test_resume_of_an_out_dir_that_is_a_file_or_empty_is_refused(tmp_path, capsys, command):
    key = RESUMABLE[command]
    file = tmp_path / "notes.txt"
    file.write_text("x")
    line = run_cli(capsys, *command, "--resume", f"{key}={file}")
    assert f"out_dir {file} (config key '{key}') is not a directory" in line
    empty = tmp_path / "empty"
    empty.mkdir()
    line = run_cli(capsys, *command, "--resume", f"{key}={empty}")
    assert f"out_dir {empty} (config key '{key}') is empty" in line


@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory) -> tuple[list[str], Path]:
    """A 2-step DPO run of a tiny Llama with a checkpoint at step 2: (its overrides, out_dir)."""
    root = tmp_path_factory.mktemp("resume")
    model = save_tiny_llama(root / "model", build_tiny_tokenizer())
    data = root / "pairs.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": "one two", "chosen": f"three {w}", "rejected": "four"}) + "\n"
            for w in ("five", "six", "seven", "one")
        )
    )
    out_dir = root / "run"
    argv = [
        "train",
        f"model.name_or_path={model}",
        f"data.path={data}",
        f"trainer.out_dir={out_dir}",
        "trainer.batch_size=2",
        "trainer.max_steps=2",
        "trainer.progress=false",
    ]
    assert main(argv) == 0
    assert (out_dir / "checkpoints" / "step-2" / "state.json").is_file()
    return argv, out_dir


def broken_copy(checkpointed_run, tmp_path: Path) -> tuple[list[str], Path]:
    """A copy of the run (resumable to step 3) and its checkpoint directory."""
    argv, out_dir = checkpointed_run
    copy = tmp_path / "run"
    shutil.copytree(out_dir, copy, symlinks=True)
    argv = [a.replace(str(out_dir), str(copy)) for a in argv] + ["trainer.max_steps=3"]
    return [*argv, "--resume"], copy / "checkpoints" / "step-2"


def refused(capsys, argv: list[str]) -> str:
    """The one stderr line of a refused resume (the run logs its loading to stdout first)."""
    code = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in captured.err, captured
    return lines[0]


def test_a_checkpoint_without_state_json_is_a_located_error(checkpointed_run, tmp_path, capsys):
    argv, checkpoint = broken_copy(checkpointed_run, tmp_path)
    (checkpoint / "state.json").unlink()
    line = refused(capsys, argv)
    assert f"checkpoint {checkpoint} lacks state.json" in line and "Errno" not in line
    assert f"delete {checkpoint}" in line


def test_a_checkpoint_without_its_optimizer_state_is_a_located_error(
    checkpointed_run, tmp_path, capsys
):
    argv, checkpoint = broken_copy(checkpointed_run, tmp_path)
    (checkpoint / "optimizer.pt").unlink()
    line = refused(capsys, argv)
    assert f"checkpoint {checkpoint} lacks optimizer.pt" in line and "Errno" not in line


@pytest.mark.parametrize(
    "text, words",
    [
        ('{"step": 2,\n "num_processes": }', "state.json:2: not valid JSON"),
        ('{"step": "2", "num_processes": 1}', "state.json: field 'step' must be an integer"),
        ("[2]", "state.json: field 'step' must be an integer"),
    ],
)
def test_a_malformed_state_json_names_the_file_and_line(
    checkpointed_run, tmp_path, capsys, text, words
):
    argv, checkpoint = broken_copy(checkpointed_run, tmp_path)
    (checkpoint / "state.json").write_text(text)
    line = refused(capsys, argv)
    assert f"{checkpoint}/{words}" in line


def test_a_resumable_run_still_resumes(checkpointed_run, tmp_path, capsys):
    argv, checkpoint = broken_copy(checkpointed_run, tmp_path)
    (checkpoint.parent / "step-2.bak").mkdir()  # a user's copy is no checkpoint
    assert main(argv) == 0
    assert f"resumed from {checkpoint} at step 2" in capsys.readouterr().out
