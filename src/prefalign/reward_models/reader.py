"""The one reader of a sequence reward model: the head's output at the last attended position.

A sequence reward model is a one-label `AutoModelForSequenceClassification` (the backbone of a
causal LM with a scalar head, Bradley-Terry trained as in Ouyang et al. 2022). HF's own pooling
reads the head at the last token that is not the pad id; when the pad token is the EOS token
(GPT-2, Llama, SmolLM once `modeling.load_tokenizer` has given them a pad) that is the token
BEFORE the final EOS, so a padded batch and the same sequence read alone disagree. Every caller
here (reward-model training, ReST scoring, ARGS, best-of-N) reads through `SequenceRewardModel`
instead, which finds the position from the attention mask, never from token ids.

`SequenceRewardModel.forward` returns the reward of every prefix and a KV cache, so ARGS scores
a candidate token as one cached step instead of re-reading the whole prefix.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from prefalign.config import ConfigError
from prefalign.logprobs import collate_prompt_response

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def last_attended(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index [B] of each row's last position with attention mask 1 (left or right padding)."""
    width = attention_mask.shape[1]
    return width - 1 - attention_mask.long().flip(1).argmax(dim=1)


class SequenceRewardModel(torch.nn.Module):
    """A scalar-head classifier read per position: `forward` -> ([B, T] rewards, KV cache)."""

    def __init__(self, classifier: PreTrainedModel):
        super().__init__()
        if not hasattr(classifier, "score"):
            raise ConfigError(
                f"{type(classifier).__name__} has no `score` head: a reward model must be a "
                "one-label AutoModelForSequenceClassification of a causal LM (Llama, GPT-2, ...)"
            )
        self.classifier = classifier

    @property
    def config(self):
        return self.classifier.config

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cache=None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, object]:
        # Backbone and head called directly: HF's pooling searches for pad ids (see above).
        out = self.classifier.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
        )
        return self.classifier.score(out.last_hidden_state).squeeze(-1).float(), out.cache

    @torch.no_grad()
    def score(
        self,
        prompt_ids: Sequence[Sequence[int]],
        response_ids: Sequence[Sequence[int]],
        pad_id: int,
        batch_size: int = 64,
    ) -> torch.Tensor:
        """Rewards [N] of prompt+response token sequences, in batches."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        out = []
        for s in range(0, len(prompt_ids), batch_size):
            batch = collate_prompt_response(
                [list(p) for p in prompt_ids[s : s + batch_size]],
                [list(r) for r in response_ids[s : s + batch_size]],
                pad_id,
            )
            out.append(
                sequence_rewards(
                    self, batch["input_ids"].to(device), batch["attention_mask"].to(device)
                ).cpu()
            )
        self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0)

    def save_pretrained(self, *args, **kwargs) -> None:
        """The classifier in HF format (what `load_reward_model` reads back)."""
        self.classifier.save_pretrained(*args, **kwargs)


def sequence_rewards(
    rm: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Rewards [B] of padded sequences, each read at its last attended position.

    `rm` is a `SequenceRewardModel`, or one wrapped for data parallelism (its forward runs
    through the wrapper, so gradients synchronize). Columns past the longest row are dropped.
    """
    width = int(last_attended(attention_mask).max()) + 1
    input_ids, attention_mask = input_ids[:, :width], attention_mask[:, :width]
    rewards, _ = rm(input_ids, attention_mask)
    return rewards.gather(1, last_attended(attention_mask)[:, None]).squeeze(1)


def as_sequence_reward_model(model: torch.nn.Module) -> torch.nn.Module:
    """`model` itself if it already reads per position (or wraps one), else wrapped."""
    inner = getattr(model, "module", model)  # DistributedDataParallel keeps the model here
    return model if isinstance(inner, SequenceRewardModel) else SequenceRewardModel(model)


def reward_model_dir(path: str | Path) -> Path:
    """The model directory of a reward model: `path` itself, or the `final/` of a run directory."""
    path = Path(path)
    if (path / "final").is_dir() and not any(path.glob("*.safetensors")):
        path = path / "final"  # accept the run directory of `prefalign rm train` too
    if not (path / "config.json").exists():
        raise ConfigError(
            f"reward model path {path} holds no model (train one with `prefalign rm train`)"
        )
    return path


def load_reward_model(path: str | Path, device: str = "cpu") -> SequenceRewardModel:
    """A reward model saved by `prefalign rm train` (its run directory or its final/)."""
    from transformers import AutoModelForSequenceClassification

    classifier = AutoModelForSequenceClassification.from_pretrained(
        str(reward_model_dir(path)), num_labels=1
    )
    return SequenceRewardModel(classifier).to(device).eval()
