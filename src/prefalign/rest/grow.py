"""ReST's Grow step: sample N responses per prompt from the current policy, score them, store them.

Sampling is the shared batched KV-cache sampler (`prefalign.generation`). Every sample is written
to one JSONL file per Grow step, with its prompt, response text and token ids, reward, token count
and the step and policy that made it, so a user can read the data and spot reward hacking. The
file is written to a temporary name and renamed, so a file that exists is complete.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from prefalign import tasks
from prefalign.config import ConfigError, bounded
from prefalign.generation import SamplingParams, generate
from prefalign.io import read_jsonl, read_prompts, write_jsonl
from prefalign.rest.rewards import Reward


@dataclass
class GrowSpec:
    prompts: str = ""  # JSONL of {"prompt": ...} rows, or a task (toy:sentiment): its train prompts
    n_prompts: int = bounded(0, min=0)  # use the first n prompts (0: all)
    samples_per_prompt: int = bounded(8, min=1)
    temperature: float = bounded(1.0, min=0)
    top_p: float = bounded(1.0, gt=0, max=1)
    top_k: int = bounded(0, min=0)
    max_new_tokens: int = bounded(32, min=1)
    seed: int = 0  # Grow step g samples with seed + g
    batch_size: int = bounded(64, min=1)  # sequences decoded together


@dataclass
class GrownSample:
    grow_step: int
    policy: str  # the model that sampled it: "base" or "g{G}.i{I}", the Improve step it came from
    prompt_index: int
    sample_index: int
    prompt: str
    response: str
    reward: float  # the training reward (the one Improve filters on)
    n_tokens: int
    finished: bool  # ended with EOS rather than at max_new_tokens
    prompt_ids: list[int]
    response_ids: list[int]
    gold_reward: float | None = None  # the evaluation reward, when it differs from the training one


@dataclass
class GrowTimings:
    sample_seconds: float
    score_seconds: float


def load_prompts(
    spec: str, n: int = 0, split: str = "train", key: str = "grow.prompts"
) -> list[str]:
    """Prompts from a JSONL file of {"prompt": ...} rows, or a task's prompts of `split` (a task
    name such as toy:sentiment, see prefalign.tasks)."""
    if not spec:
        raise ConfigError(
            f"config key '{key}' is required: a JSONL file of {{\"prompt\": ...}} "
            f"rows, or a task: {tasks.describe_tasks()}"
        )
    if tasks.is_task_spec(spec):
        prompts = tasks.resolve_task(spec).prompts(split)
    else:
        prompts = read_prompts(spec, label=f"config key '{key}':")
    prompts = prompts[:n] if n else prompts
    if not prompts:
        raise ConfigError(f"config key '{key}': {spec} holds no prompts")
    return prompts


def grow(
    policy: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    spec: GrowSpec,
    reward: Reward,
    grow_step: int,
    policy_name: str,
    gold: Reward | None = None,
) -> tuple[list[GrownSample], GrowTimings]:
    """Sample `samples_per_prompt` responses per prompt (seed + grow_step) and score them."""
    n = spec.samples_per_prompt
    expanded = [p for p in prompts for _ in range(n)]
    params = SamplingParams(
        max_new_tokens=spec.max_new_tokens,
        temperature=spec.temperature,
        top_k=spec.top_k,
        top_p=spec.top_p,
        seed=spec.seed + grow_step,
        batch_size=spec.batch_size,
    )
    t0 = time.perf_counter()
    generations = generate(policy, tokenizer, expanded, params)
    t1 = time.perf_counter()
    texts = [g.text for g in generations]
    rewards = reward.score(expanded, texts)
    golds = gold.score(expanded, texts) if gold is not None else [None] * len(texts)
    t2 = time.perf_counter()
    eos = tokenizer.eos_token_id
    samples = [
        GrownSample(
            grow_step=grow_step,
            policy=policy_name,
            prompt_index=k // n,
            sample_index=k % n,
            prompt=expanded[k],
            response=g.text,
            reward=float(r),
            n_tokens=len(g.response_ids),
            finished=bool(g.response_ids) and g.response_ids[-1] == eos,
            prompt_ids=list(g.prompt_ids),
            response_ids=list(g.response_ids),
            gold_reward=gd,
        )
        for k, (g, r, gd) in enumerate(zip(generations, rewards, golds, strict=True))
    ]
    return samples, GrowTimings(t1 - t0, t2 - t1)


def write_samples(path: Path, samples: Sequence[GrownSample]) -> None:
    """Write atomically: a complete file or none."""
    write_jsonl(path, (asdict(s) for s in samples))


def read_samples(path: Path) -> list[GrownSample]:
    return [GrownSample(**row) for row in read_jsonl(path)]


def reward_summary(values: Sequence[float]) -> dict[str, float]:
    """Mean, spread and quantiles of a reward distribution, for step records and plots."""
    if not values:
        return {}
    ordered = sorted(values)

    def q(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))]

    return {
        "mean": statistics.fmean(ordered),
        "std": statistics.pstdev(ordered),
        "min": ordered[0],
        "p10": q(0.1),
        "p50": q(0.5),
        "p90": q(0.9),
        "max": ordered[-1],
    }
