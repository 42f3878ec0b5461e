"""Held-out evaluation after each ReST step: the gold reward, the training reward and the KL to the
initial policy, all on the same samples of the same held-out prompts (fixed seed, so the curve
over steps compares policies, not sampling noise).

Reporting the training reward beside the gold reward is what exposes over-optimization: with a
learned reward model, the first can climb while the second stalls or falls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from prefalign.config import bounded
from prefalign.evaluation.core import evaluate_policy, mean_and_se
from prefalign.rest.grow import load_prompts
from prefalign.rest.rewards import Reward
from prefalign.tasks import resolve_task


@dataclass
class EvalSpec:
    task: str | None = None  # a task (prefalign.tasks): gold reward, its metrics; None: neither
    prompts: str = ""  # JSONL of {"prompt": ...} or a task; empty: the held-out prompts of `task`
    n_prompts: int = bounded(64, min=0)
    samples_per_prompt: int = bounded(1, min=1)
    max_new_tokens: int = bounded(0, min=0)  # 0: grow.max_new_tokens
    seed: int = 1234


class HeldOutEval:
    """`evaluate(policy) -> record`; an empty record when there are no held-out prompts."""

    def __init__(
        self,
        spec: EvalSpec,
        tokenizer: PreTrainedTokenizerBase,
        initial: torch.nn.Module,
        reward: Reward,
        reward_is_gold: bool,
        max_new_tokens: int,
    ):
        self.spec, self.tokenizer, self.initial = spec, tokenizer, initial
        self.max_new_tokens = spec.max_new_tokens or max_new_tokens
        self.reward, self.reward_is_gold = reward, reward_is_gold
        self.task = resolve_task(spec.task) if spec.task else None
        self.prompts: list[str] = []
        if spec.prompts:
            self.prompts = load_prompts(spec.prompts, spec.n_prompts, "eval", key="eval.prompts")
        elif self.task is not None:
            self.prompts = self.task.prompts("eval")[: spec.n_prompts]

    def __call__(self, policy: torch.nn.Module) -> dict:
        if not self.prompts:
            return {}
        spec = self.spec
        result = evaluate_policy(
            policy,
            self.tokenizer,
            self.task or "custom",
            self.prompts,
            reference=self.initial,
            samples_per_prompt=spec.samples_per_prompt,
            max_new_tokens=self.max_new_tokens,
            seed=spec.seed,
            reward_fn=None if self.task else (lambda p, c: 0.0),
        )
        out = {"kl": result.kl, "kl_se": result.kl_se, "mean_length": result.mean_length}
        if self.task is not None:
            out.update(gold_reward=result.gold_reward, gold_reward_se=result.gold_reward_se)
            if result.accuracy is not None:
                out["accuracy"] = result.accuracy
        if self.reward_is_gold:
            out["reward"] = result.gold_reward
        else:
            scores = self.reward.score(
                [s["prompt"] for s in result.samples], [s["response"] for s in result.samples]
            )
            out["reward"], out["reward_se"] = mean_and_se(scores)
        out["seconds"] = result.seconds
        return {k: round(v, 5) if isinstance(v, float) else v for k, v in out.items()}
