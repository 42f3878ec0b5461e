"""Batches of pairs and unpaired (KTO) examples in the layout of `prefalign.logprobs`.

Every batch is right-padded to its own longest row only, with `attention_mask` 1 on real
tokens and a bool `loss_mask` True on response tokens. Which examples share a batch is the
Trainer's one batch plan (`prefalign.training.loop.batch_plan`: length-grouped, seeded); SFT
rows go straight to `prefalign.logprobs.collate_prompt_response`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from prefalign.config import ConfigError
from prefalign.data.tokenize import TokenizedPair, TokenizedUnpaired
from prefalign.logprobs import collate_prompt_response


def collate_pairs(pairs: Sequence[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """[2B, T] batch: rows 0..B-1 are the chosen sequences, rows B..2B-1 the rejected ones."""
    prompts = [p.prompt_ids for p in pairs]
    responses = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    return collate_prompt_response(prompts + prompts, responses, pad_id)


def collate_unpaired(
    examples: Sequence[TokenizedUnpaired], pad_id: int, max_length: int | None = None
) -> dict[str, torch.Tensor]:
    """KTO batch, plus the mismatched batch its KL baseline is estimated on.

    `kl_*` pairs prompt i with completion (i+1) mod B: a completion written for another prompt,
    so the policy/reference log-ratio on it estimates KL(policy || reference) without sampling.
    The rotation needs B > 1. `max_length` cuts a borrowed completion that no longer fits.
    """
    if len(examples) < 2:
        raise ConfigError(
            "an unpaired (KTO) batch needs at least 2 examples to build its KL batch, "
            f"got {len(examples)}; "
            "raise the batch size or drop the last partial batch"
        )
    prompts = [e.prompt_ids for e in examples]
    completions = [e.completion_ids for e in examples]
    batch = collate_prompt_response(prompts, completions, pad_id)
    batch["labels"] = torch.tensor([e.label for e in examples], dtype=torch.bool)
    shifted = completions[1:] + completions[:1]
    if max_length is not None:
        shifted = [c[: max(1, max_length - len(p))] for p, c in zip(prompts, shifted, strict=True)]
    kl = collate_prompt_response(prompts, shifted, pad_id)
    batch.update({f"kl_{k}": v for k, v in kl.items()})
    return batch
