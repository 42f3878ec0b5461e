"""Pluggable rewards for ReST's Grow step: a toy task's gold reward, a Python function, or a
learned reward model. Every reward scores a batch: `reward.score(prompts, responses) -> floats`.

The reward used to filter grown samples and the gold reward used to evaluate the policy are
separate objects, so a learned reward model that the policy learns to exploit shows up as a
training reward that rises while the gold reward does not.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from prefalign.toy.rewards import GOLD_REWARDS, gold_reward_fn
from prefalign.userfiles import import_python_file

PairFn = Callable[[str, str], float]


@dataclass
class RewardSpec:
    kind: Literal["gold", "function", "model"] = "gold"
    task: str = ""  # kind gold: sentiment | arith | brevity (default with a toy:<task> model: that task)
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
    target, sep, name = spec.rpartition(":")  # rpartition: Windows paths contain ':'
    if not sep or not target or not name:
        raise ValueError(f"reward.function must be 'module:function' or 'path/to/file.py:function', got {spec!r}")
    if target.endswith(".py") or "/" in target:
        module = import_python_file(target, "reward.function:", "_prefalign_reward")
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as err:
            raise ValueError(f"reward.function: cannot import module {target!r} ({err})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"reward.function: {target} has no callable {name!r}")
    return fn


def gold_reward(task: str) -> FunctionReward:
    return FunctionReward(gold_reward_fn(task), f"gold:{task}")


def load_reward(spec: RewardSpec, device: str = "cpu") -> Reward:
    """The reward a ReST run filters with."""
    if spec.kind == "gold":
        if not spec.task:
            raise ValueError(f"config key 'reward.task' is required with reward.kind=gold ({', '.join(GOLD_REWARDS)})")
        if spec.task not in GOLD_REWARDS:
            raise ValueError(f"config key 'reward.task': got {spec.task!r}, allowed: {', '.join(GOLD_REWARDS)}")
        return gold_reward(spec.task)
    if spec.kind == "function":
        if not spec.function:
            raise ValueError("config key 'reward.function' is required with reward.kind=function")
        return FunctionReward(load_function(spec.function), spec.function)
    if not spec.model_path:
        raise ValueError("config key 'reward.model_path' is required with reward.kind=model")
    from prefalign.reward_models.scoring import RewardModel

    return RewardModel.from_pretrained(spec.model_path, device=device, batch_size=spec.batch_size)
