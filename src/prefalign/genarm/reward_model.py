"""A sequence reward model for the baselines: a causal LM backbone with a scalar head.

ARGS and best-of-N score whole (partial) responses with a classic reward model, trained here on
the same pairs as the ARM with the Bradley-Terry loss `-log sigmoid(r(chosen) - r(rejected))`,
so the comparison with GenARM is data for data. The reward of a sequence is the head's output
at its last real token; `forward` returns it at every position, which lets ARGS score a
candidate token as one cached step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from prefalign.logprobs import collate_prompt_response
from prefalign.training.loop import Trainer, TrainerConfig


class SequenceRewardModel(torch.nn.Module):
    """Reward of every prefix: `forward` -> ([B, T] rewards, KV cache)."""

    def __init__(self, classifier: PreTrainedModel):
        super().__init__()
        self.classifier = classifier

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, object]:
        # The backbone and head are called directly: HF's pooling finds the last token by
        # searching for pad ids, which is wrong when pad == EOS and for one-token cached steps.
        out = self.classifier.base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, use_cache=use_cache,
        )
        return self.classifier.score(out.last_hidden_state).squeeze(-1).float(), out.past_key_values

    @torch.no_grad()
    def score(
        self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], pad_id: int, batch_size: int = 64
    ) -> torch.Tensor:
        """Rewards of prompt+response sequences, in batches."""
        self.eval()
        device = next(self.parameters()).device
        out = []
        for s in range(0, len(prompt_ids), batch_size):
            batch = collate_prompt_response(
                [list(p) for p in prompt_ids[s : s + batch_size]], [list(r) for r in response_ids[s : s + batch_size]], pad_id
            )
            out.append(last_rewards(self, batch["input_ids"].to(device), batch["attention_mask"].to(device)).cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def save_pretrained(self, path: str | Path, **kwargs) -> None:
        self.classifier.save_pretrained(path, **kwargs)


def load_reward_model(path: str | Path, device: str = "cpu") -> SequenceRewardModel:
    """A saved reward model, or a causal LM checkpoint with a fresh (random) scalar head."""
    from transformers.utils import logging as hf_logging

    # From a causal LM the head is new and lm_head unused: expected, so not worth a load report.
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        classifier = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1)
    finally:
        hf_logging.set_verbosity(level)
    return SequenceRewardModel(classifier).to(device).eval()


@dataclass
class RewardModelResult:
    path: Path
    pair_accuracy: float | None
    seconds: float


def train_reward_model(
    init_path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    pairs_path: str | Path,
    trainer: TrainerConfig,
    eval_pairs_path: str | Path | None = None,
    max_length: int = 512,
) -> RewardModelResult:
    """Fit a Bradley-Terry reward model on preference pairs with the shared Trainer."""
    from prefalign.data import collate_pairs, load_preference_data, tokenize_preference

    records = load_preference_data(pairs_path, tokenizer=tokenizer, skip_invalid=True).records
    pairs, _ = tokenize_preference(records, tokenizer, max_length=max_length, max_prompt_length=max_length // 2, skip_invalid=True)
    model = load_reward_model(init_path)
    model.train()
    run = Trainer(model, trainer, n_examples=len(pairs), tokenizer=tokenizer)  # saves final/ with the tokenizer

    def loss_fn(rm: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        rewards = last_rewards(rm, batch["input_ids"], batch["attention_mask"])
        chosen, rejected = rewards.chunk(2)
        return -F.logsigmoid(chosen - rejected).mean(), {"accuracy": (chosen > rejected).float().mean()}

    result = run.fit([p.length for p in pairs], lambda idx: collate_pairs([pairs[i] for i in idx], tokenizer.pad_token_id), loss_fn)
    run.end()
    rm = run.unwrapped.eval()
    accuracy = reward_model_accuracy(rm, tokenizer, eval_pairs_path) if eval_pairs_path else None
    return RewardModelResult(Path(trainer.out_dir) / "final", accuracy, result.seconds)


def last_rewards(rm: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Rewards [B] of right-padded sequences, read at each row's last real token."""
    rewards, _ = rm(input_ids, attention_mask)
    last = attention_mask.long().sum(dim=1) - 1
    return rewards.gather(1, last[:, None]).squeeze(1)


@torch.no_grad()
def reward_model_accuracy(rm: SequenceRewardModel, tokenizer: PreTrainedTokenizerBase, pairs_path: str | Path) -> float:
    """Share of held-out pairs where the reward model scores chosen above rejected."""
    from prefalign.data import load_preference_data, tokenize_preference

    records = load_preference_data(pairs_path, tokenizer=tokenizer, skip_invalid=True).records
    pairs, _ = tokenize_preference(records, tokenizer, max_length=512, max_prompt_length=256, skip_invalid=True)
    prompts = [p.prompt_ids for p in pairs]
    chosen = rm.score(prompts, [p.chosen_ids for p in pairs], tokenizer.pad_token_id)
    rejected = rm.score(prompts, [p.rejected_ids for p in pairs], tokenizer.pad_token_id)
    return float((chosen > rejected).float().mean())
