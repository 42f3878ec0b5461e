"""Gold reward and KL(policy || reference) on held-out prompts, from the policy's own samples.

KL is estimated per sequence as the mean over samples y ~ policy of log p_policy(y) - log p_ref(y)
(response tokens only), which is unbiased only for samples from the policy itself: evaluation
therefore samples at temperature 1 with no top-k/top-p truncation.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from prefalign.generation import Generation, SamplingParams, generate
from prefalign.logprobs import collate_prompt_response, sequence_logps
from prefalign.tasks import Task, resolve_task

RewardFn = Callable[[str, str], float]


@dataclass
class EvalResult:
    task: str
    n: int
    gold_reward: float
    gold_reward_se: float
    kl: float
    kl_se: float
    mean_length: float  # response tokens
    seconds: float
    accuracy: float | None = None  # the task's "accuracy" metric, if it has one
    extra_rewards: dict[str, float] = field(default_factory=dict)  # its other metrics
    samples: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        """Everything but the samples, rounded for tables and JSON."""
        out = {k: v for k, v in asdict(self).items() if k != "samples"}
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def mean_and_se(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


@torch.no_grad()
def response_logps(
    model: torch.nn.Module, generations: Sequence[Generation], pad_id: int, batch_size: int = 64
) -> torch.Tensor:
    """Summed log-probs of each generation's response tokens under `model`, in batches."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for s in range(0, len(generations), batch_size):
        chunk = generations[s : s + batch_size]
        batch = collate_prompt_response(
            [g.prompt_ids for g in chunk], [g.response_ids for g in chunk], pad_id
        )
        batch = {k: v.to(device) for k, v in batch.items()}
        out.append(sequence_logps(model, **batch).sum.float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def sequence_kl(
    policy: torch.nn.Module,
    reference: torch.nn.Module,
    generations: Sequence[Generation],
    pad_id: int,
) -> torch.Tensor:
    """Per-sample log p_policy(y) - log p_ref(y); its mean over policy samples estimates KL."""
    return response_logps(policy, generations, pad_id) - response_logps(
        reference, generations, pad_id
    )


def evaluate_policy(
    policy: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: str | Task,
    prompts: Sequence[str],
    reference: torch.nn.Module | None = None,
    samples_per_prompt: int = 1,
    max_new_tokens: int = 24,
    seed: int = 0,
    batch_size: int = 64,
    reward_fn: RewardFn | None = None,
    generations: Sequence[Generation] | None = None,
) -> EvalResult:
    """Sample the policy on `prompts`, score with the task's gold reward, estimate KL to
    `reference`.

    `task` is a `Task` or a registered task name (`prefalign.tasks.resolve_task`); with a
    `reward_fn`, a name is only a label and the task's extra metrics are skipped.
    `generations` may be given (e.g. from guided decoding); then KL is measured for those samples.
    """
    start = time.perf_counter()
    task_name = task.name if isinstance(task, Task) else task
    if reward_fn is None or isinstance(task, Task):
        task = resolve_task(task)
    expanded = [p for p in prompts for _ in range(samples_per_prompt)]
    if generations is None:
        params = SamplingParams(
            max_new_tokens=max_new_tokens, temperature=1.0, seed=seed, batch_size=batch_size
        )
        generations = generate(policy, tokenizer, expanded, params)
    texts = [g.text for g in generations]
    if reward_fn is None:
        rewards = task.gold_reward(expanded, texts)
    else:
        rewards = [reward_fn(p, t) for p, t in zip(expanded, texts, strict=True)]
    gold, gold_se = mean_and_se(rewards)
    if reference is not None:
        kls = sequence_kl(policy, reference, generations, tokenizer.pad_token_id).tolist()
    else:
        kls = [0.0] * len(generations)
    kl, kl_se = mean_and_se(kls)
    result = EvalResult(
        task=task_name,
        n=len(generations),
        gold_reward=gold,
        gold_reward_se=gold_se,
        kl=kl,
        kl_se=kl_se,
        mean_length=sum(len(g.response_ids) for g in generations) / max(1, len(generations)),
        seconds=time.perf_counter() - start,
    )
    if isinstance(task, Task):
        metrics = task.metrics(expanded, texts)
        result.accuracy = metrics.pop("accuracy", None)  # the accuracy column of every table
        result.extra_rewards.update(metrics)
    result.samples = [
        {"prompt": p, "response": g.text, "reward": r, "kl": k}
        for p, g, r, k in zip(expanded, generations, rewards, kls, strict=True)
    ]
    return result
