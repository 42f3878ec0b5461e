"""KTO (Ethayarajh et al. 2024): an objective for unpaired (prompt, completion, desirable?) data."""

from __future__ import annotations

import torch
from torch import Tensor


def kto_kl_reference_point(kl_policy_logps: Tensor, kl_reference_logps: Tensor) -> Tensor:
    """Batch estimate of KL(policy || reference), detached and NOT clamped (a scalar tensor).

    The log-probs are of mismatched (prompt_i, completion_j) pairs, which the caller builds (TRL
    rotates the completions of a batch by one). TRL averages this estimate over all processes
    (`gather_for_metrics(...).mean()`) before clamping at 0; a multi-process trainer does the
    same by all-reducing this value before passing it to `kto_loss` as `reference_point`.
    """
    return (kl_policy_logps - kl_reference_logps).mean().detach()


def kto_loss(
    policy_logps: Tensor,
    reference_logps: Tensor,
    labels: Tensor,
    reference_point: Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> Tensor:
    """Per-example KTO loss [B]; `labels` is True for desirable completions.

    `reference_point` is the batch's KL estimate (`kto_kl_reference_point`, all-reduced across
    processes). With `z0 = max(reference_point, 0)` (no gradient) and
    `r = policy_logps - reference_logps`: desirable `w_d * (1 - sigmoid(beta * (r - z0)))`,
    undesirable `w_u * (1 - sigmoid(beta * (z0 - r)))`.
    """
    z0 = reference_point.detach().clamp(min=0)
    logratio = policy_logps - reference_logps
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (logratio - z0)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratio)))
    return torch.where(labels.bool(), desirable, undesirable)
