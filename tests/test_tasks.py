"""The task registry: toy tasks registered lazily, user tasks from files, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from prefalign.errors import UserError
from prefalign.tasks import Task, register_provider, register_task, resolve_task, task_names


def test_importing_the_registry_imports_no_world():
    code = "import sys, prefalign.tasks; print([m for m in sys.modules if 'prefalign.toy' in m])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_toy_tasks_resolve_by_name_and_by_alias():
    assert {"toy:sentiment", "toy:arith", "toy:brevity"} <= set(task_names())
    for alias in ("sentiment", "arith", "brevity"):
        assert resolve_task(alias) is resolve_task(f"toy:{alias}")
    arith = resolve_task("toy:arith")
    assert arith.gold_reward(["417+285=", "1+2="], ["702", "x"]) == [1.0, 0.0]
    assert arith.metrics(["1+2=", "1+2="], ["3", "4"]) == {"accuracy": 0.5}
    assert set(resolve_task("sentiment").metrics(["the film"], ["was great"])) == {"brevity"}


def test_a_toy_task_bound_to_a_world_reads_its_prompts_policy_and_files(mini_worlds):
    from prefalign.toy.tasks import world_task

    world = mini_worlds["arith"]
    task = world_task(world)
    assert task.name == "toy:arith"
    assert task.prompts("eval") == world.prompts("eval")
    assert task.policy_path() == str(world.policy_path)
    assert task.file("pairs") == world.file("pairs.jsonl")
    with pytest.raises(UserError, match="no split 'test', allowed: train, eval"):
        task.prompts("test")


def test_unknown_task_is_one_line_naming_the_known_ones():
    with pytest.raises(UserError, match=r"unknown task 'toy:poetry'; known: .*toy:arith"):
        resolve_task("toy:poetry")
    with pytest.raises(UserError, match="unknown task 'nonsense'"):
        resolve_task("nonsense")


def test_a_provider_is_imported_only_when_its_prefix_is_asked_for(tmp_path, monkeypatch):
    (tmp_path / "my_tasks_provider.py").write_text(
        textwrap.dedent("""
        from prefalign.tasks import Task, per_sample, register_task
        register_task(Task("mine:len", lambda split: ["a", "bb"], per_sample(lambda p, r: len(r))))
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    register_provider("mine", "my_tasks_provider")
    assert "my_tasks_provider" not in sys.modules
    task = resolve_task("mine:len")
    assert "my_tasks_provider" in sys.modules
    assert task.gold_reward(["a", "b"], ["xyz", ""]) == [3.0, 0.0]
    assert "mine:len" in task_names()


def test_register_task_refuses_a_second_task_of_the_same_name():
    first = register_task(Task("test:dup", lambda s: ["p"], lambda p, r: [0.0] * len(p)))
    with pytest.raises(ValueError, match="already registered"):
        register_task(Task("test:dup", lambda s: ["q"], lambda p, r: [1.0] * len(p)))
    assert resolve_task("test:dup") is first


def write_prompts(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_user_task_from_a_prompts_file_and_a_reward_file(tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    (tmp_path / "score.py").write_text(
        "def loud(prompt, response):\n    return response.count('!')\n"
    )
    task = resolve_task(f"user:{prompts}:{tmp_path / 'score.py'}:loud")
    assert task.prompts("train") == task.prompts("eval") == ["a", "b"]
    assert task.gold_reward(["a", "b"], ["hi!!", "no"]) == [2.0, 0.0]
    assert resolve_task(f"user:{prompts}:{tmp_path / 'score.py'}:loud") is task  # imported once


def test_user_task_with_a_module_reward(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", [{"prompt": "x"}])
    task = resolve_task(f"user:{prompts}:operator:ne")
    assert task.gold_reward(["x", "y"], ["x", "z"]) == [0.0, 1.0]


def test_task_file_with_splits_metrics_and_relative_paths(tmp_path):
    write_prompts(tmp_path / "train.jsonl", [{"prompt": "1+1="}])
    write_prompts(tmp_path / "eval.jsonl", [{"prompt": "2+2="}, {"prompt": "3+3="}])
    (tmp_path / "rewards.py").write_text(
        textwrap.dedent("""
        def exact(prompt, response):
            a, b = prompt.rstrip("=").split("+")
            return float(response.strip() == str(int(a) + int(b)))
    """)
    )
    (tmp_path / "task.yaml").write_text(
        textwrap.dedent("""
        name: sums
        prompts: {train: train.jsonl, eval: eval.jsonl}
        reward: rewards.py:exact
        metrics: {accuracy: rewards.py:exact}
    """)
    )
    task = resolve_task(f"user:{tmp_path / 'task.yaml'}")
    assert task.name == "sums"
    assert task.prompts("eval") == ["2+2=", "3+3="]
    assert task.gold_reward(["2+2=", "3+3="], ["4", "7"]) == [1.0, 0.0]
    assert task.metrics(["2+2=", "3+3="], ["4", "7"]) == {"accuracy": 0.5}
    with pytest.raises(UserError, match="has no default policy"):
        task.policy_path()


@pytest.mark.parametrize(
    ("setup", "spec", "message"),
    [
        (
            lambda d: None,
            "user:{d}/missing.jsonl:operator:ne",
            "prompts file of split 'train' not found",
        ),
        (
            lambda d: write_prompts(d / "p.jsonl", [{"prompt": "x"}]),
            "user:{d}/p.jsonl",
            "expected user:PROMPTS",
        ),
        (
            lambda d: write_prompts(d / "p.jsonl", [{"prompt": "x"}]),
            "user:{d}/p.jsonl:nosuchmodule_xyz:f",
            "cannot import module 'nosuchmodule_xyz'",
        ),
        (
            lambda d: write_prompts(d / "p.jsonl", [{"prompt": "x"}]),
            "user:{d}/p.jsonl:operator:nope",
            "operator has no callable 'nope'",
        ),
        (
            lambda d: (d / "t.yaml").write_text("prompts: p.jsonl\nreward: operator:ne\nbeta: 1\n"),
            "user:{d}/t.yaml",
            "unknown key 'beta'",
        ),
        (
            lambda d: (d / "t.yaml").write_text("prompts: p.jsonl\n"),
            "user:{d}/t.yaml",
            "key 'reward' is required",
        ),
    ],
)
def test_bad_user_tasks_fail_with_one_line(tmp_path, setup, spec, message):
    setup(tmp_path)
    with pytest.raises(UserError, match=message) as info:
        resolve_task(spec.format(d=tmp_path))
    assert "\n" not in str(info.value)


def test_a_bad_prompt_row_names_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    task = resolve_task(f"user:{path}:operator:ne")
    with pytest.raises(
        UserError, match=rf"{path}:2: expected an object with a string field 'prompt'"
    ):
        task.prompts("eval")
