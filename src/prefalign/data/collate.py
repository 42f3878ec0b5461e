"""Batches in the layout of `prefalign.logprobs`, and a length-grouped batch sampler.

Every batch is right-padded to its own longest row only, with `attention_mask` 1 on real
tokens and a bool `loss_mask` True on response tokens.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from prefalign.data.tokenize import TokenizedExample, TokenizedPair, TokenizedUnpaired
from prefalign.logprobs import collate_prompt_response


def collate_pairs(pairs: Sequence[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """[2B, T] batch: rows 0..B-1 are the chosen sequences, rows B..2B-1 the rejected ones."""
    prompts = [p.prompt_ids for p in pairs]
    responses = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    return collate_prompt_response(prompts + prompts, responses, pad_id)


def collate_sft(examples: Sequence[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    return collate_prompt_response(
        [e.prompt_ids for e in examples], [e.completion_ids for e in examples], pad_id
    )


def collate_unpaired(
    examples: Sequence[TokenizedUnpaired], pad_id: int, max_length: int | None = None
) -> dict[str, torch.Tensor]:
    """KTO batch, plus the mismatched batch its KL baseline is estimated on.

    `kl_*` pairs prompt i with completion (i+1) mod B: a completion written for another prompt,
    so the policy/reference log-ratio on it estimates KL(policy || reference) without sampling.
    The rotation needs B > 1. `max_length` cuts a borrowed completion that no longer fits.
    """
    if len(examples) < 2:
        raise ValueError(
            f"an unpaired (KTO) batch needs at least 2 examples to build its KL batch, got {len(examples)}; "
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


def length_grouped_batches(
    lengths: Sequence[int],
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    *,
    mega_batch_mult: int = 50,
    drop_last: bool = False,
) -> list[list[int]]:
    """Batches of indices whose rows have similar lengths, so little compute goes to padding.

    shuffle=True: a seeded random permutation is cut into mega-batches of
    `batch_size * mega_batch_mult` indices, each sorted by length and cut into batches, and the
    batches are shuffled: padding stays small while the order stays random. The batch holding
    the longest row goes first so an out-of-memory shows at step one, not hours in.
    shuffle=False (evaluation): all indices sorted by length, longest first.
    Every index appears exactly once (unless drop_last drops a final partial batch).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")

    def by_length(indices: list[int]) -> list[int]:
        return sorted(indices, key=lambda i: -lengths[i])  # stable: ties keep their order

    def chunk(indices: list[int]) -> list[list[int]]:
        return [indices[s : s + batch_size] for s in range(0, len(indices), batch_size)]

    if not shuffle:
        batches = chunk(by_length(list(range(len(lengths)))))
    else:
        rng = random.Random(seed)
        order = list(range(len(lengths)))
        rng.shuffle(order)
        mega = batch_size * mega_batch_mult
        batches = [
            b for s in range(0, len(order), mega) for b in chunk(by_length(order[s : s + mega]))
        ]
        rng.shuffle(batches)
        if batches:
            longest = max(range(len(batches)), key=lambda k: max(lengths[i] for i in batches[k]))
            batches.insert(0, batches.pop(longest))
    if drop_last:
        batches = [b for b in batches if len(b) == batch_size]
    return batches
