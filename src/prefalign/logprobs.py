"""Sequence log-probabilities of responses, prompt tokens masked.

Batches are right-padded token matrices with a `loss_mask` that is True on response tokens.
A preference batch stacks its B chosen rows on top of its B rejected rows, so the policy (and
the reference) score both halves in one forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SequenceLogps:
    """Per-sequence summed log-probs of response tokens and the number of those tokens."""

    sum: torch.Tensor  # [N]
    n_tokens: torch.Tensor  # [N]

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.n_tokens.clamp(min=1)


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels) under logits, one value per position, without a [N, T, V] log-softmax copy."""
    logits = logits.float()
    picked = torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def sequence_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
) -> SequenceLogps:
    """Sum of log p(y_t | x, y_<t) over the positions where `loss_mask` is True.

    Padding is trimmed to the longest real row first, so a batch never pays for more columns than
    its longest sequence.
    """
    width = int(attention_mask.sum(dim=1).max())
    input_ids, attention_mask, loss_mask = input_ids[:, :width], attention_mask[:, :width], loss_mask[:, :width]
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    # Position t predicts token t+1: shift labels and mask left by one.
    per_token = token_logps(logits[:, :-1], input_ids[:, 1:])
    mask = loss_mask[:, 1:].to(per_token.dtype)
    return SequenceLogps(sum=(per_token * mask).sum(dim=1), n_tokens=mask.sum(dim=1))


def split_pairs(logps: SequenceLogps) -> tuple[SequenceLogps, SequenceLogps]:
    """Split the stacked [chosen; rejected] result of a preference batch into its halves."""
    half = logps.sum.shape[0] // 2
    return (
        SequenceLogps(logps.sum[:half], logps.n_tokens[:half]),
        SequenceLogps(logps.sum[half:], logps.n_tokens[half:]),
    )


def nll_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Token-averaged negative log-likelihood of the response tokens of a batch (SFT, BC)."""
    logps = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    return -logps.sum.sum() / logps.n_tokens.sum().clamp(min=1)


def pad_right(rows: list[list[int]], pad_value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), pad_value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def collate_prompt_response(
    prompts: list[list[int]], responses: list[list[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Right-padded batch of prompt+response token lists with a response-only loss mask."""
    rows = [p + r for p, r in zip(prompts, responses, strict=True)]
    input_ids = pad_right(rows, pad_id)
    attention_mask = pad_right([[1] * len(r) for r in rows], 0)
    loss_mask = pad_right([[0] * len(p) + [1] * len(r) for p, r in zip(prompts, responses, strict=True)], 0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask.bool()}
