"""Reading a sequence reward model token by token, for ARGS and best-of-N.

The reward model is the one `prefalign rm train` (`prefalign.rest.reward_model`) trains: a
one-label `AutoModelForSequenceClassification` on the policy's backbone, Bradley-Terry on
preference pairs. Its reward of a sequence is the head's output at the last real token; this
wrapper returns that output at every position and keeps a KV cache, so ARGS scores a candidate
token as one cached step instead of re-reading the whole prefix.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from prefalign.logprobs import collate_prompt_response

if TYPE_CHECKING:
    from transformers import PreTrainedModel


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


def last_rewards(rm: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Rewards [B] of right-padded sequences, read at each row's last real token."""
    rewards, _ = rm(input_ids, attention_mask)
    last = attention_mask.long().sum(dim=1) - 1
    return rewards.gather(1, last[:, None]).squeeze(1)


def load_reward_model(path: str | Path, device: str = "cpu") -> SequenceRewardModel:
    """A reward model saved by `prefalign rm train` (its run directory or its final/)."""
    path = Path(path)
    if (path / "final").is_dir() and not any(path.glob("*.safetensors")):
        path = path / "final"
    from transformers import AutoModelForSequenceClassification

    classifier = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1)
    return SequenceRewardModel(classifier).to(device).eval()
