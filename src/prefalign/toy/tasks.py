"""The toy world's tasks, registered when `prefalign.tasks` first resolves a "toy:" name.

    toy:sentiment  review openings; gold reward VADER sentiment; extra metric brevity
    toy:arith      sums like "417+285="; gold reward checked sums; extra metric accuracy
    toy:brevity    the review openings scored by brevity (conflicts with sentiment)

Each task reads the cached world of its default config lazily, so resolving a name builds
nothing; `world_task(world)` binds a task to a given world (a mini one in tests, a larger one
in the demo).
"""

from __future__ import annotations

from prefalign.tasks import Task, per_sample, register_task
from prefalign.toy.rewards import GOLD_REWARDS, arith_correct, brevity_reward
from prefalign.toy.world import ToyWorld, get_world

# task -> (world it reads prompts and policy from, extra metrics)
TOY_TASKS = {
    "sentiment": ("sentiment", {"brevity": per_sample(brevity_reward)}),
    "arith": ("arith", {"accuracy": per_sample(arith_correct)}),
    "brevity": ("sentiment", {}),
}


def toy_task(task: str, world: ToyWorld | None = None) -> Task:
    """The task `toy:<task>` on `world` (default: the cached world of the default config)."""
    if task not in TOY_TASKS:
        raise ValueError(f"unknown toy task {task!r}, allowed: {', '.join(TOY_TASKS)}")
    world_name, metrics = TOY_TASKS[task]

    def the_world() -> ToyWorld:
        return world or get_world(world_name)

    return Task(
        name=f"toy:{task}",
        load_prompts=lambda split: the_world().prompts(split),
        reward=per_sample(GOLD_REWARDS[task]),
        metric_fns=metrics,
        policy=lambda: the_world().policy_path,
        files=lambda name: the_world().file(f"{name}.jsonl"),
        description=f"the embedded toy world's {task} task",
    )


def world_task(world: ToyWorld) -> Task:
    """The task of a built toy world (its own prompts, policy and data files)."""
    return toy_task(world.task, world)


for _name in TOY_TASKS:
    register_task(toy_task(_name), replace=True)
