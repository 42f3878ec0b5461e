"""The SmolLM2 world's tasks, registered when `prefalign.tasks` first resolves a "smol:" name.

    smol:sentiment  one-sentence film reviews; gold reward VADER compound; extra metric brevity
    smol:arith      "What is a + b?" in chat form; gold reward the exact sum; metric accuracy
    smol:brevity    the review prompts scored by brevity (conflicts with sentiment)

Resolving a name builds nothing: the world (model import, sampled pairs) is built on first use.
"""

from __future__ import annotations

from prefalign.smol.rewards import arith_correct, arith_reward, brevity_reward, sentiment_reward
from prefalign.smol.world import SmolWorld, get_smol_world
from prefalign.tasks import Task, TaskError, per_sample, register_task

# task -> (world it reads prompts and policy from, gold reward, extra metrics)
SMOL_TASKS = {
    "sentiment": ("sentiment", sentiment_reward, {"brevity": per_sample(brevity_reward)}),
    "arith": ("arith", arith_reward, {"accuracy": per_sample(arith_correct)}),
    "brevity": ("sentiment", brevity_reward, {}),
}


def smol_task(task: str, world: SmolWorld | None = None) -> Task:
    """The task `smol:<task>` on `world` (default: the cached world of the default config)."""
    if task not in SMOL_TASKS:
        raise TaskError(f"unknown SmolLM2 task {task!r}, allowed: {', '.join(SMOL_TASKS)}")
    world_name, reward, metrics = SMOL_TASKS[task]

    def the_world() -> SmolWorld:
        return world or get_smol_world(world_name)

    return Task(
        name=f"smol:{task}",
        load_prompts=lambda split: the_world().prompts(split),
        reward=per_sample(reward),
        metric_fns=metrics,
        policy=lambda: the_world().policy_path,
        files=lambda name: the_world().file(f"{name}.jsonl"),
        description=f"SmolLM2-135M-Instruct's {task} task",
    )


def world_task(world: SmolWorld) -> Task:
    return smol_task(world.task, world)


for _name in SMOL_TASKS:
    register_task(smol_task(_name), replace=True)
