"""Shared-prompt forward (prefix sharing): each prompt computed once, both responses on top.

A preference pair is packed into one row, `prompt + chosen + rejected`, and a block attention
mask keeps the two responses apart: every token attends causally to the prompt and to its own
response, never to the other response; the rejected response's position ids restart where the
prompt ends. Each response token then sees exactly the keys and positions it sees in the plain
`[prompt + chosen; prompt + rejected]` batch, so the log-probs are equal (up to float rounding)
while the prompt's tokens are computed once instead of twice. This is the prefix-sharing scheme
of Wang et al., "Accelerating Direct Preference Optimization with Prefix Sharing" (2024).

It is exact for decoders whose positions come only from `position_ids` (rotary or learned
absolute embeddings) and whose attention takes an explicit 4D mask (eager or SDPA);
`shared_prompt_exact` says whether a model qualifies, and other models use the plain layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from prefalign.logprobs import (
    SequenceLogps,
    causal_lm_parts,
    gathered_token_logps,
    per_row_sums,
    split_pairs,
)
from prefalign.logprobs import sequence_logps as concatenated_logps

# Architectures verified to take positions only from position_ids and to honour a 4D mask (the
# equality tests cover llama, qwen2 and gpt2; the others share llama's attention code).
SHARED_PROMPT_ARCHITECTURES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gpt2",
    "phi3",
    "olmo2",
    "smollm3",
)
MASK_ATTENTION = ("eager", "sdpa")


def shared_prompt_exact(model: torch.nn.Module, max_width: int | None = None) -> bool:
    """Whether the packed, block-masked forward of `model` equals its plain forward."""
    parts = causal_lm_parts(model)
    if parts is None:
        return False
    config = _config(model)
    if config.model_type not in SHARED_PROMPT_ARCHITECTURES:
        return False
    if getattr(config, "_attn_implementation", None) not in MASK_ATTENTION:
        return False
    # A sliding window would be applied by the model's own mask, which a 4D mask replaces.
    window = getattr(config, "sliding_window", None)
    uses_window = window is not None and getattr(config, "use_sliding_window", True)
    return not uses_window or (max_width is not None and max_width <= window)


def collate_shared_pairs(
    prompts: Sequence[Sequence[int]],
    chosen: Sequence[Sequence[int]],
    rejected: Sequence[Sequence[int]],
    pad_id: int,
) -> dict[str, torch.Tensor]:
    """[B, T] rows `prompt + chosen + rejected`, right-padded, with their segment lengths [B, 3]."""
    rows = [list(p) + list(c) + list(r) for p, c, r in zip(prompts, chosen, rejected, strict=True)]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    segments = torch.tensor(
        [[len(p), len(c), len(r)] for p, c, r in zip(prompts, chosen, rejected, strict=True)],
        dtype=torch.long,
    )
    return {"input_ids": input_ids, "segments": segments}


def block_attention(segments: torch.Tensor, width: int, dtype: torch.dtype, additive: bool):
    """Position ids [B, T] and the 4D mask [B, 1, T, T] of packed rows.

    A query attends to key k <= q unless k is padding or (query in rejected, key in chosen).
    Padding queries attend to themselves only, so no softmax row is empty (an empty row would
    give NaN, and NaN times a zero gradient is still NaN). `additive`: a float mask of 0 / -inf
    for eager attention, else a boolean one (True = attend) for SDPA.
    """
    lp, lc, lr = (s[:, None] for s in segments.unbind(1))
    pos = torch.arange(width, device=segments.device)[None]
    segment = (pos >= lp).long() + (pos >= lp + lc).long() + (pos >= lp + lc + lr).long()  # 0..3
    position_ids = torch.where(segment == 2, pos - lc, pos)
    q_seg, k_seg = segment[:, :, None], segment[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool, device=segments.device).tril()
    allowed = causal & (k_seg != 3) & ~((q_seg == 2) & (k_seg == 1))
    allowed |= torch.eye(width, dtype=torch.bool, device=segments.device) & (q_seg == 3)
    mask = allowed[:, None]
    if additive:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(dtype).min
        )
    return position_ids, mask


def shared_pair_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[SequenceLogps, SequenceLogps]:
    """(chosen, rejected) log-probs of a packed batch from one forward pass over each prompt."""
    input_ids, segments = batch["input_ids"], batch["segments"]
    width = int(segments.sum(dim=1).max())
    input_ids = input_ids[:, :width]
    lp, lc, lr = (s[:, None] for s in segments.unbind(1))
    pos = torch.arange(width, device=input_ids.device)[None]
    # Token t of a response is predicted from the hidden state one position earlier in its own
    # sequence; the first rejected token's predecessor is the prompt's last token.
    is_chosen = (pos >= lp) & (pos < lp + lc) & (pos >= 1)
    is_rejected = (pos >= lp + lc) & (pos < lp + lc + lr) & (pos - lc >= 1)
    source = torch.where(pos == lp + lc, lp - 1, pos - 1)
    c_rows, c_cols = is_chosen.nonzero(as_tuple=True)
    r_rows, r_cols = is_rejected.nonzero(as_tuple=True)
    rows = torch.cat([c_rows, r_rows])
    hidden_cols = torch.cat([c_cols - 1, source[r_rows, r_cols]])
    labels = torch.cat([input_ids[c_rows, c_cols], input_ids[r_rows, r_cols]])
    config = _config(model)
    additive = config._attn_implementation == "eager"
    position_ids, mask = block_attention(segments, width, _dtype(model), additive)
    per_token = gathered_token_logps(
        model, input_ids, mask, rows, hidden_cols, labels, position_ids=position_ids
    )
    if per_token is None:
        raise ValueError(
            "shared-prompt batches need a Hugging Face causal LM (check shared_prompt_exact first)"
        )
    n = input_ids.shape[0]
    c_logps, r_logps = per_token[: len(c_rows)], per_token[len(c_rows) :]
    chosen = SequenceLogps(per_row_sums(c_logps, c_rows, n), is_chosen.sum(dim=1).float())
    rejected = SequenceLogps(per_row_sums(r_logps, r_rows, n), is_rejected.sum(dim=1).float())
    return chosen, rejected


def pair_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[SequenceLogps, SequenceLogps]:
    """(chosen, rejected) log-probs of a preference batch in either layout: packed (`segments`)
    or the stacked `[chosen; rejected]` rows of `prefalign.data.collate_pairs`."""
    if "segments" in batch:
        return shared_pair_logps(model, batch)
    return split_pairs(
        concatenated_logps(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    )


def _config(model: torch.nn.Module):
    inner = getattr(model, "module", model)
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return inner.config


def _dtype(model: torch.nn.Module) -> torch.dtype:
    if torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"):
        device = "cuda" if torch.is_autocast_enabled("cuda") else "cpu"
        return torch.get_autocast_dtype(device)
    return next(p for p in model.parameters() if p.is_floating_point()).dtype
