"""Demo world families: which worlds `prefalign demo --world NAME` runs on and which rows.

A world is what the rows read (`World` below): `prefalign.toy.world.ToyWorld` is one.

A `WorldFamily` names its default tasks, builds (or loads) the world of a task, gives the
`Task` that scores that world's samples, and lists the rows to run on it, in table order.
Families register themselves with `register_world_family` from a module of this package;
`get_world_family(name)` imports the module listed for `name` in `FAMILY_MODULES` the first
time it is asked for, so a family that needs heavy imports costs nothing until used. To add
one: write `prefalign/demo/<name>.py` that calls `register_world_family(...)` and add its
name and module to `FAMILY_MODULES`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from prefalign.errors import UserError
from prefalign.tasks import Task

if TYPE_CHECKING:
    from prefalign.training.malloc import Decision

# family name -> the module that registers it when imported
FAMILY_MODULES: dict[str, str] = {
    "toy": "prefalign.demo.toy",
    "smollm2": "prefalign.demo.smollm2",
    "smollm2-full": "prefalign.demo.smollm2",
}


class World(Protocol):
    """What a demo row reads of its world.

    task           the task's short name ("sentiment", "arith"): the table's task column
    root           the world's directory
    policy_path    the SFT policy every row starts from and measures KL against
    file(name)     data files: "pairs.jsonl", "pairs_eval.jsonl", "unpaired.jsonl",
                   "prompts_train.jsonl", "prompts_eval.jsonl"
    prompts(split) the "train" and "eval" prompts
    info()         {"config": {"max_new_tokens": ...}, "figures": {build figures}}
    """

    task: str
    root: Path

    @property
    def policy_path(self) -> Path: ...

    def file(self, name: str) -> Path: ...

    def prompts(self, split: str) -> list[str]: ...

    def info(self) -> dict[str, Any]: ...


# A demo row: (world, DemoSettings) -> dict of figures.
MethodFn = Callable[..., dict]


@dataclass(frozen=True)
class WorldFamily:
    name: str
    tasks: tuple[str, ...]  # the default tasks, in table order
    load: Callable[..., World]  # load(task, log=print) -> the world, built first if missing
    task_of: Callable[[World], Task]  # the Task scoring a world of this family
    rows: Callable[[str, bool], dict[str, MethodFn]]  # rows(task, quick) -> {name: row}
    description: str = ""
    label: str = ""  # what the report calls its worlds ("Toy", "SmolLM2-135M-Instruct")
    # The demo process's mmap threshold in KiB (prefalign.training.malloc), decided before
    # its first row: 0 where returning freed buffers costs more page faults than the memory
    # is worth; None: the trainer's default.
    mmap_threshold_kib: int | None = None

    def decide_mmap_threshold(self) -> Decision:
        """Fix this family's threshold for the process (every row runs with it)."""
        from prefalign.training.malloc import decide_mmap_threshold

        return decide_mmap_threshold(self.mmap_threshold_kib, f"the {self.name} demo")


_FAMILIES: dict[str, WorldFamily] = {}


class WorldError(UserError, ValueError):
    """An unknown demo world or task; one line for the user."""


def register_world_family(family: WorldFamily) -> WorldFamily:
    _FAMILIES[family.name] = family
    return family


def world_family_names() -> list[str]:
    return sorted(set(FAMILY_MODULES) | set(_FAMILIES))


def describe_world_families() -> str:
    """The families `prefalign demo --world` accepts, for its help text."""
    return ", ".join(world_family_names())


def get_world_family(name: str) -> WorldFamily:
    if name not in _FAMILIES and name in FAMILY_MODULES:
        importlib.import_module(FAMILY_MODULES[name])
    if name not in _FAMILIES:
        raise WorldError(f"unknown demo world {name!r}, allowed: {', '.join(world_family_names())}")
    return _FAMILIES[name]
