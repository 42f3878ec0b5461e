"""What every demo row shares: the run's settings and one evaluation of a saved model.

A row is a function `(world, settings) -> dict` of figures (`prefalign.demo.worlds.World`
says what a row may read of its world).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefalign.demo.seeds import with_seed_band
from prefalign.demo.worlds import MethodFn, World, get_world_family
from prefalign.evaluation.core import evaluate_policy
from prefalign.modeling import load_model, load_tokenizer
from prefalign.report.demo import format_band

__all__ = ["DemoSettings", "MethodFn", "World", "evaluate_model", "format_row", "method_sft"]


@dataclass
class DemoSettings:
    quick: bool
    n_eval_prompts: int
    samples_per_prompt: int
    out_dir: Path
    world: str = "toy"  # the demo world family (prefalign.demo.worlds)
    # Seeds of the rows that report a seed band (offline objectives and sft): training batch
    # order and evaluation samples; the full demo runs 3, --quick one.
    seeds: tuple[int, ...] = (0,)

    @classmethod
    def make(
        cls, quick: bool, out_dir: Path, world: str = "toy", seeds: int | None = None
    ) -> DemoSettings:
        """`seeds`: how many seeds the banded rows run (default 3, 1 with `quick`)."""
        return cls(
            quick=quick,
            n_eval_prompts=64 if quick else 128,
            samples_per_prompt=2 if quick else 4,
            out_dir=out_dir,
            world=world,
            seeds=tuple(range(seeds or (1 if quick else 3))),
        )


def evaluate_model(
    world: World, settings: DemoSettings, model_path: str | Path, reference=None, seed: int = 0
) -> dict:
    """Gold reward, KL to the SFT policy (and the task's metrics) of a saved model on the
    world's held-out prompts, sampled with `seed`."""
    tokenizer = load_tokenizer(model_path)
    policy = load_model(model_path, device="cpu")
    reference = reference if reference is not None else load_model(world.policy_path, device="cpu")
    prompts = world.prompts("eval")[: settings.n_eval_prompts]
    result = evaluate_policy(
        policy,
        tokenizer,
        get_world_family(settings.world).task_of(world),
        prompts,
        reference=reference,
        samples_per_prompt=settings.samples_per_prompt,
        max_new_tokens=world.info()["config"]["max_new_tokens"],
        seed=seed,
    )
    summary = result.summary()
    summary["task"] = world.task  # the table's name, not the registry's
    return summary


def method_sft(world: World, settings: DemoSettings) -> dict:
    """The SFT policy; its band is the evaluation's sampling noise alone."""
    runs = [evaluate_model(world, settings, world.policy_path, seed=s) for s in settings.seeds]
    return with_seed_band(runs, settings.seeds)


def format_row(row: dict) -> str:
    parts = [f"gold_reward={row['gold_reward']:.3f}", f"kl={row['kl']:.3f}"]
    if row.get("accuracy") is not None:
        parts.append(f"accuracy={row['accuracy']:.3f}")
    if format_band(row, "gold_reward"):
        parts.append(f"band gold {format_band(row, 'gold_reward')}, kl {format_band(row, 'kl')}")
    return " ".join(parts)
