"""Pluggable rewards for ReST's Grow step: a task's gold reward, a Python function, or a
learned reward model. Every reward scores a batch: `reward.score(prompts, responses) -> floats`.

The reward used to filter grown samples and the gold reward used to evaluate the policy are
separate objects, so a learned reward model that the policy learns to exploit shows up as a
training reward that rises while the gold reward does not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from prefalign import tasks
from prefalign.config import ConfigError

PairFn = Callable[[str, str], float]


@dataclass
class RewardSpec:
    kind: Literal["gold", "function", "model"] = "gold"
    task: str = ""  # kind gold: a task (prefalign.tasks); default: the model's, if it is a task
    function: str = ""  # kind function: "package.module:function" or "path/to/file.py:function"
    model_path: str = ""  # kind model: a directory written by `prefalign rm train` (its final/)
    batch_size: int = 64  # kind model: sequences per forward pass


class Reward(Protocol):
    name: str

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]: ...


class FunctionReward:
    """A plain `fn(prompt, completion) -> float`, called once per sample."""

    def __init__(self, fn: PairFn, name: str):
        self.fn, self.name = fn, name

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return [float(self.fn(p, r)) for p, r in zip(prompts, responses, strict=True)]


def load_function(spec: str) -> PairFn:
    """Import `module:function` or `path/to/file.py:function` (the file runs as ordinary Python)."""
    return tasks.load_function(spec, "reward.function")


class TaskReward:
    """A task's gold reward (`prefalign.tasks`), scoring whole batches."""

    def __init__(self, task: tasks.Task):
        self.task, self.name = task, f"gold:{task.name}"

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return self.task.gold_reward(prompts, responses)


def gold_reward(task: str, key: str = "eval.task") -> TaskReward:
    """The gold reward of the task named `task`; errors name the config `key`."""
    try:
        return TaskReward(tasks.resolve_task(task))
    except tasks.TaskError as err:
        raise tasks.TaskError(f"config key '{key}': {err}") from None


def load_reward(spec: RewardSpec, device: str = "cpu") -> Reward:
    """The reward a ReST run filters with."""
    if spec.kind == "gold":
        if not spec.task:
            raise tasks.TaskError(
                "config key 'reward.task' is required with reward.kind=gold "
                f"({', '.join(tasks.task_names())}, or user:PROMPTS.jsonl:module:function)"
            )
        return gold_reward(spec.task, "reward.task")
    if spec.kind == "function":
        if not spec.function:
            raise ConfigError("config key 'reward.function' is required with reward.kind=function")
        return FunctionReward(load_function(spec.function), spec.function)
    if not spec.model_path:
        raise ConfigError("config key 'reward.model_path' is required with reward.kind=model")
    from prefalign.reward_models.scoring import RewardModel

    return RewardModel.from_pretrained(spec.model_path, device=device, batch_size=spec.batch_size)
