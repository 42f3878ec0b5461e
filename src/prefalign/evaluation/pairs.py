"""Implicit-reward accuracy and margin of a policy on held-out preference pairs."""

from __future__ import annotations

import torch

from prefalign.logprobs import sequence_logps, split_pairs


def load_eval_pairs(tokenizer, path: str, data_config, log=print) -> list:
    """Held-out pairs, read and tokenized like the training data: a bad row stops the run,
    or with `data_config.skip_invalid` is skipped and counted in a printed line."""
    from prefalign.data import load_preference_data, tokenize_preference

    skip = bool(getattr(data_config, "skip_invalid", False))
    loaded = load_preference_data(path, tokenizer=tokenizer, skip_invalid=skip)
    pairs, skipped = tokenize_preference(
        loaded.records,
        tokenizer,
        **data_config.limits(),
        skip_invalid=skip,
    )
    skipped = loaded.skipped + skipped
    if skipped:
        log(f"skipped {sum(skipped.values())} invalid rows of {path}: {dict(skipped)}")
    return pairs


@torch.no_grad()
def pair_metrics(
    model,
    reference,
    tokenizer,
    path: str,
    beta: float,
    data_config,
    batch_size: int = 32,
    pairs: list | None = None,
) -> dict[str, float]:
    """Share of held-out pairs where beta * (log-ratio of chosen - log-ratio of rejected) > 0,
    and the mean of that margin. `reference` is a ReferencePolicy (or None for reference-free).
    Periodic evaluation passes `pairs` tokenized once instead of re-reading `path` each time."""
    from prefalign.data import collate_pairs

    if pairs is None:
        pairs = load_eval_pairs(tokenizer, path, data_config)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    margins = []
    for s in range(0, len(pairs), batch_size):
        batch = {
            k: v.to(device)
            for k, v in collate_pairs(pairs[s : s + batch_size], tokenizer.pad_token_id).items()
        }
        inputs = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
        chosen, rejected = split_pairs(sequence_logps(model, *inputs))
        margin = chosen.sum - rejected.sum
        if reference is not None and reference.spec.mode != "none":
            ref_chosen, ref_rejected = split_pairs(reference.logps(*inputs))
            margin = margin - (ref_chosen.sum - ref_rejected.sum)
        margins.append(beta * margin.float().cpu())
    model.train(was_training)
    if not margins:
        return {}
    all_margins = torch.cat(margins)
    return {
        "pair_accuracy": float((all_margins > 0).float().mean()),
        "pair_margin": float(all_margins.mean()),
    }
