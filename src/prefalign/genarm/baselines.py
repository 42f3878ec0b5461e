"""Baselines GenARM is compared with: ARGS and best-of-N, both driven by a sequence reward model.

ARGS (Khanov et al. 2024): at each step take the base's top-k tokens and score each candidate
`c` by `log pi_base(c) + w * r(x, y_<t c)` with a full-sequence reward model: k reward-model
evaluations per token. Here the reward model keeps a KV cache of the prefix, so a candidate is
one cached step (the prefix is not recomputed k times), and the chosen candidate's cache rows
become the next prefix, so no extra reward-model pass is needed to advance.

Best-of-N: N samples from the base per prompt, keep the one the reward model scores highest.
Its KL to the base is at most `log N - (N - 1) / N` (Stiennon et al. 2020), reported as such.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from prefalign.generation import Generation, SamplingParams, StepFn, generate
from prefalign.reward_models.reader import SequenceRewardModel
from prefalign.tasks import PairFn as RewardFn


class ArgsRewardTracker:
    """A `generation.Guide`: the reward model's KV cache over the decoded prefix."""

    def __init__(self, rm: SequenceRewardModel):
        self.rm = rm
        self.past = None
        self.mask: torch.Tensor | None = None
        self.expanded = None  # cache of prefix + each candidate, [B * k] rows
        self.candidates: torch.Tensor | None = None

    @torch.no_grad()
    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> ArgsRewardTracker:
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        _, self.past = self.rm(input_ids, attention_mask, positions, None, use_cache=True)
        self.mask = attention_mask
        return self

    @torch.no_grad()
    def candidate_rewards(self, candidates: torch.Tensor) -> torch.Tensor:
        """Rewards [B, k] of the prefix extended by each candidate token [B, k]."""
        batch, k = candidates.shape
        expanded = copy.deepcopy(self.past)
        expanded.batch_repeat_interleave(k)
        mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1).repeat_interleave(
            k, dim=0
        )
        positions = self.mask.long().sum(dim=1, keepdim=True).repeat_interleave(k, dim=0)
        rewards, self.expanded = self.rm(
            candidates.reshape(-1, 1), mask, positions, expanded, use_cache=True
        )
        self.candidates = candidates
        return rewards[:, -1].reshape(batch, k)

    @torch.no_grad()
    def step(self, next_ids: torch.Tensor, attention_mask: torch.Tensor) -> ArgsRewardTracker:
        # The chosen token was a candidate: keep its rows of the expanded cache. Finished rows
        # (fed a pad token) keep candidate 0; their outputs are discarded anyway.
        k = self.candidates.shape[1]
        pick = (self.candidates == next_ids[:, None]).long().argmax(dim=1)
        rows = torch.arange(len(next_ids), device=next_ids.device) * k + pick
        self.expanded.batch_select_indices(rows)
        self.past, self.expanded, self.mask = self.expanded, None, attention_mask
        return self


def args_generate(
    base: torch.nn.Module,
    rm: SequenceRewardModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    params: SamplingParams,
    k: int = 10,
    weight: float = 1.0,
    on_step: StepFn | None = None,
) -> list[Generation]:
    """ARGS decoding: top-k base candidates rescored by `log pi_base + weight * reward`.

    Sampling (or greedy) then runs over the k rescored candidates only.
    """
    rm.eval()

    def score_fn(base_logps: torch.Tensor, trackers: list[ArgsRewardTracker]) -> torch.Tensor:
        cand_logps, candidates = base_logps.topk(min(k, base_logps.shape[-1]), dim=-1)
        rewards = trackers[0].candidate_rewards(candidates)
        scores = torch.full_like(base_logps, float("-inf"))
        return scores.scatter(-1, candidates, cand_logps + weight * rewards)

    return generate(
        base,
        tokenizer,
        prompts,
        params,
        score_fn=score_fn,
        guides=[ArgsRewardTracker(rm)],
        on_step=on_step,
    )


def best_of_n(
    base: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    params: SamplingParams,
    n: int,
    rm: SequenceRewardModel | None = None,
    reward_fn: RewardFn | None = None,
) -> tuple[list[Generation], list[float]]:
    """Per prompt, the best of `n` base samples by the reward model (or a text reward function).

    Returns the chosen generations and their rewards, in prompt order.
    """
    if (rm is None) == (reward_fn is None):
        raise ValueError(
            "best_of_n needs exactly one of a reward model (rm) or a reward function (reward_fn)"
        )
    expanded = [p for p in prompts for _ in range(n)]
    samples = generate(base, tokenizer, expanded, params)
    if rm is not None:
        rewards = rm.score(
            [g.prompt_ids for g in samples],
            [g.response_ids for g in samples],
            tokenizer.pad_token_id,
        )
    else:
        rewards = torch.tensor(
            [reward_fn(p, g.text) for p, g in zip(expanded, samples, strict=True)]
        )
    best = rewards.reshape(len(prompts), n).argmax(dim=1)
    chosen = [samples[i * n + int(j)] for i, j in enumerate(best)]
    return chosen, [float(rewards[i * n + int(j)]) for i, j in enumerate(best)]


def best_of_n_kl_bound(n: int) -> float:
    """Upper bound on KL(best-of-n || base), in nats."""
    return math.log(n) - (n - 1) / n
