"""How preference batches go through the model: the layout of their rows and where the
reference's log-probs come from.

- Shared prompt (`speed.shared_prompt: auto`): where the model allows it exactly, every pair is
  one packed row `prompt + chosen + rejected` (`prefalign.shared_prompt`), so the prompt is
  computed once for the policy and once for the reference instead of twice each.
- Reference cache (`speed.reference_cache: auto`): a frozen reference's log-probs are computed
  once per fingerprint and read from disk afterwards (`prefalign.training.ref_cache`);
  trust-region references move, so they are always computed live.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from prefalign.data.collate import collate_pairs
from prefalign.data.tokenize import TokenizedPair
from prefalign.logprobs import SequenceLogps
from prefalign.reference import ReferencePolicy
from prefalign.shared_prompt import collate_shared_pairs, pair_logps, shared_prompt_exact

PairLogps = tuple[SequenceLogps, SequenceLogps]


@dataclass
class SpeedSpec:
    """Exact speed-ups of preference training; "off" forces the plain computation."""

    shared_prompt: Literal["auto", "off"] = "auto"  # packed rows wherever exact for the model
    reference_cache: Literal["auto", "off"] = "auto"  # frozen reference: log-probs once, on disk


def use_shared_prompt(
    spec: SpeedSpec, model: torch.nn.Module, examples: Sequence[TokenizedPair]
) -> bool:
    if spec.shared_prompt == "off" or not examples:
        return False
    widest = max(len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in examples)
    return shared_prompt_exact(model, max_width=widest)


def pair_collator(
    examples: Sequence[TokenizedPair], pad_id: int, shared: bool
) -> Callable[[list[int]], dict[str, torch.Tensor]]:
    """collate(indices): the pairs' batch in the packed or stacked layout, with their indices
    (which a reference cache looks its rows up by)."""

    def collate(indices: list[int]) -> dict[str, torch.Tensor]:
        pairs = [examples[i] for i in indices]
        if shared:
            batch = collate_shared_pairs(
                [p.prompt_ids for p in pairs],
                [p.chosen_ids for p in pairs],
                [p.rejected_ids for p in pairs],
                pad_id,
            )
        else:
            batch = collate_pairs(pairs, pad_id)
        batch["index"] = torch.tensor(indices, dtype=torch.long)
        return batch

    return collate


def live_reference_logps(reference: ReferencePolicy) -> Callable[[dict], PairLogps]:
    return lambda batch: reference.score(lambda model: pair_logps(model, batch))
