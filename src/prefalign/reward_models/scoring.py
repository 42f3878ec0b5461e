"""A trained reward model as a text `Reward` (what ReST filters with): batched scoring of
(prompt, response) strings, tokenized with the layout every method trains on."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from prefalign.data import PromptCompletionRecord, tokenize_sft
from prefalign.modeling import load_tokenizer, resolve_device
from prefalign.reward_models.reader import (
    as_sequence_reward_model,
    load_reward_model,
    reward_model_dir,
)


class RewardModel:
    """Scores `[BOS] prompt | response [EOS]` texts with a sequence reward model."""

    def __init__(
        self, model: torch.nn.Module, tokenizer, batch_size: int = 64, name: str = "reward-model"
    ):
        self.model = as_sequence_reward_model(model).eval()
        self.tokenizer, self.batch_size, self.name = tokenizer, batch_size, name

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: str = "cpu", batch_size: int = 64
    ) -> RewardModel:
        path = reward_model_dir(path)
        model = load_reward_model(path, device=str(resolve_device(device)))
        return cls(model, load_tokenizer(path), batch_size, name=f"rm:{path}")

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        records = [
            PromptCompletionRecord(p, r, "<reward-model>", i)
            for i, (p, r) in enumerate(zip(prompts, responses, strict=True))
        ]
        rows, _ = tokenize_sft(records, self.tokenizer, max_length=None, max_prompt_length=None)
        return self.model.score(
            [e.prompt_ids for e in rows],
            [e.completion_ids for e in rows],
            self.tokenizer.pad_token_id,
            self.batch_size,
        ).tolist()
