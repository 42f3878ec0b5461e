"""The command table: every command parses, config commands take --config/--resume and
overrides, and only errors raised on purpose print as one line."""

from __future__ import annotations

import pytest
import torch

from prefalign import cli
from prefalign.errors import UserError
from prefalign.rest.grow import load_prompts
from prefalign.training.loop import TrainingDiverged


def raised(fn) -> BaseException:
    try:
        fn()
    except BaseException as err:  # noqa: BLE001 - the test inspects whatever it was
        return err
    raise AssertionError("no error")


def test_every_command_in_the_table_has_a_parser_and_a_handler():
    parser = cli.build_parser()
    for command in cli.COMMANDS:
        argv = command.name.split()
        with pytest.raises(SystemExit) as info:
            parser.parse_args([*argv, "--help"])
        assert info.value.code == 0
        assert callable(cli.load_attr(command.handler)), command.name
        if command.schema:
            assert isinstance(cli.load_attr(command.schema), type), command.name


def test_a_library_value_error_is_a_bug_and_ours_is_one_line():
    torch_error = raised(
        lambda: torch.nn.functional.cross_entropy(
            torch.zeros(2, 3), torch.zeros(3, dtype=torch.long)
        )
    )
    assert isinstance(torch_error, ValueError) and not cli.is_user_error(torch_error)
    assert cli.is_user_error(raised(lambda: load_prompts("")))  # `raise ValueError` in prefalign
    # a builtin failing is no message of ours
    assert not cli.is_user_error(raised(lambda: int("x")))
    assert cli.is_user_error(TrainingDiverged("step 3: loss is nan"))
    assert cli.is_user_error(UserError("bad"))
    assert not cli.is_user_error(RuntimeError("bad"))
