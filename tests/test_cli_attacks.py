"""Bad input found by attacking the CLI by hand: each a one-line error naming the config key
or the directory, exit code 2, nothing trained."""

from __future__ import annotations

import importlib.util

import pytest
from test_resume_errors import checkpointed_run, refused  # noqa: F401  (a fixture)


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@pytest.mark.parametrize(
    "tracker, words",
    [
        ("nope", "config key 'trainer.report_to': got 'nope', allowed: all, aim, "),
        pytest.param(
            "tensorboard",
            "config key 'trainer.report_to': 'tensorboard' is not installed here",
            marks=pytest.mark.skipif(installed("tensorboard"), reason="tensorboard installed"),
        ),
    ],
)
def test_an_unknown_or_missing_tracker_is_refused(
    checkpointed_run,  # noqa: F811  (the imported fixture)
    tmp_path,
    capsys,
    tracker,
    words,
):
    """An unknown tracker was a traceback from accelerate; one not installed was dropped
    silently (a run asked to log to tensorboard wrote no logs)."""
    argv, out_dir = checkpointed_run
    argv = [a.replace(str(out_dir), str(tmp_path / "run")) for a in argv]
    line = refused(capsys, [*argv, f"trainer.report_to=[{tracker}]"])
    assert words in line
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("command", [("train",), ("sft",), ("rm", "train"), ("discover",)])
def test_an_out_dir_that_cannot_be_made_names_it(tmp_path, capsys, command):
    """It was a bare "[Errno 20] Not a directory: ..." naming neither key nor cause."""
    blocker = tmp_path / "notes.txt"
    blocker.write_text("x")
    out_dir = blocker / "run"
    key = "out_dir" if command == ("discover",) else "trainer.out_dir"
    extra = (
        ["proposer.kind=offline", "proxy.task=synthetic"]
        if command == ("discover",)
        else ["model.name_or_path=./no-such-model", "data.path=./no-such.jsonl"]
    )
    line = refused(capsys, [*command, f"{key}={out_dir}", *extra])
    assert f"out_dir {out_dir}: cannot create it (Not a directory)" in line
