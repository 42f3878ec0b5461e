"""Mistakes a user can fix raise `UserError` subclasses (one line, exit code 2 in the CLI), so a
library caller can tell them from bugs with `except UserError`; internal invariants stay plain
ValueErrors. These used to be bare ValueErrors, recognised only by where they were raised."""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path

import pytest

import prefalign
from prefalign.errors import RunDirError, UserError

PACKAGE = Path(prefalign.__file__).parent


def test_no_bare_value_error_names_a_config_key() -> None:
    """A message that names a config key is a user error by construction."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)):
                continue
            call = node.exc
            if not (isinstance(call.func, ast.Name) and call.func.id == "ValueError"):
                continue
            first = call.args[0] if call.args else None
            if isinstance(first, ast.JoinedStr) and first.values:
                first = first.values[0]
            if isinstance(first, ast.Constant) and str(first.value).startswith("config key"):
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert offenders == []


def rest_threshold_count() -> None:
    from prefalign.rest.filtering import threshold_list

    threshold_list(3, [0.1, 0.2], None)


def reference_alpha() -> None:
    from prefalign.reference import ReferenceSpec

    ReferenceSpec(mode="soft", alpha=2.0)


def judge_concurrency() -> None:
    from prefalign.evaluation.judge import JudgeConfig

    JudgeConfig(base_url="http://127.0.0.1:1/v1", model="m", concurrency=0)


def unknown_objective() -> None:
    from prefalign.objectives import get

    get("no_such_objective")


def arm_with_reference() -> None:
    from prefalign.config import load_config
    from prefalign.genarm.arm import ArmConfig, check_arm_config

    check_arm_config(load_config(ArmConfig, None, ["reference.mode=frozen"]))


def generate_options() -> None:
    from prefalign.genarm.cli import check_params
    from prefalign.generation import SamplingParams

    check_params(SamplingParams(max_new_tokens=0))


def smol_unknown_task() -> None:
    from prefalign.smol.tasks import smol_task

    smol_task("poetry")


def smol_config_unknown_task() -> None:
    from prefalign.smol.world import SmolConfig

    SmolConfig.for_task("poetry")


def smol_not_an_arithmetic_prompt() -> None:
    from prefalign.smol.rewards import arith_reward

    arith_reward("Tell me a story.", "42")


def toy_not_an_arithmetic_prompt() -> None:  # int("hello ") raised inside Python: a traceback
    from prefalign.toy.rewards import arith_reward

    arith_reward("hello there", "42")


def smol_operand_range_too_small() -> None:
    from prefalign.smol.prompts import arith_problems

    arith_problems(2, 4, n_train=64, n_eval=32, seed=0)


def report_without_run_dirs() -> None:
    import argparse

    from prefalign.report import report_cli

    report_cli(argparse.Namespace(run_dirs=[], out=None))


CASES: dict[str, Callable[[], None]] = {
    "smol_unknown_task": smol_unknown_task,
    "smol_config_unknown_task": smol_config_unknown_task,
    "smol_not_an_arithmetic_prompt": smol_not_an_arithmetic_prompt,
    "toy_not_an_arithmetic_prompt": toy_not_an_arithmetic_prompt,
    "smol_operand_range_too_small": smol_operand_range_too_small,
    "report_without_run_dirs": report_without_run_dirs,
    "rest_threshold_count": rest_threshold_count,
    "reference_alpha": reference_alpha,
    "judge_concurrency": judge_concurrency,
    "unknown_objective": unknown_objective,
    "arm_with_reference": arm_with_reference,
    "generate_options": generate_options,
}


@pytest.mark.parametrize("name", list(CASES))
def test_user_input_errors_are_user_errors(name: str) -> None:
    with pytest.raises(UserError) as info:
        CASES[name]()
    assert isinstance(info.value, ValueError)  # callers catching ValueError still do
    assert "\n" not in str(info.value)


def test_a_used_out_dir_is_a_run_dir_error(tmp_path: Path) -> None:
    from prefalign.rest.state import RunState

    (tmp_path / "something").write_text("x")
    with pytest.raises(RunDirError, match="is not empty; pass --resume"):
        RunState.open(tmp_path, {}, resume=False)
