"""Pairwise preference objectives: per-pair losses of the four sequence log-probs.

Every function takes `(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
reference_rejected_logps)` as [B] tensors plus keyword hyper-parameters, and returns the [B]
per-pair loss (the trainer takes the mean). Inputs are summed response log-probs, except for the
objectives registered with `length_normalized=True` (IPO), whose caller passes per-token means.

Notation: `rho = (pc - pr) - (rc - rr)`, `z = beta * rho`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def log_ratio_margin(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
) -> Tensor:
    """`rho`: chosen log-ratio minus rejected log-ratio."""
    # Policy and reference log-probs are close early in training: subtracting them first keeps
    # the small log-ratios exact instead of taking the difference of two large numbers.
    chosen = policy_chosen_logps - reference_chosen_logps
    rejected = policy_rejected_logps - reference_rejected_logps
    return chosen - rejected


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> Tensor:
    """DPO (Rafailov et al. 2023); with `label_smoothing` = eps > 0 the conservative cDPO form
    `-(1 - eps) log sigmoid(z) - eps log sigmoid(-z)`."""
    z = beta * log_ratio_margin(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def robust_dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> Tensor:
    """rDPO (Chowdhury et al. 2024): unbiased under labels flipped with probability eps,
    `(-(1 - eps) log sigmoid(z) + eps log sigmoid(-z)) / (1 - 2 eps)`."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust: label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    z = beta * log_ratio_margin(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    clean = -(1 - label_smoothing) * F.logsigmoid(z)
    flipped = -label_smoothing * F.logsigmoid(-z)
    return (clean - flipped) / (1 - 2 * label_smoothing)


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float = 0.1,
) -> Tensor:
    """IPO (Azar et al. 2023, Eq. 17; beta is the paper's tau): `(rho - 1 / (2 beta))^2`.

    The inputs must be per-token MEAN log-probs (registered with `length_normalized=True`): the
    squared loss would otherwise scale with the response length. This is TRL's normalization,
    which the IPO authors confirmed; policy and reference share a response's token count, so the
    log-ratio of means equals the summed log-ratio divided by that count.
    """
    rho = log_ratio_margin(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    return (rho - 1 / (2 * beta)) ** 2


def hinge_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float = 0.1,
) -> Tensor:
    """SLiC hinge (Zhao et al. 2023) on the DPO margin: `relu(1 - z)`."""
    z = beta * log_ratio_margin(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    return torch.relu(1 - z)


def discopop_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float = 0.05,
    tau: float = 0.05,
) -> Tensor:
    """DiscoPOP / LRML (Lu et al. 2024): `m = sigmoid(z / tau)`,
    `(1 - m) * (-log sigmoid(z)) + m * exp(-z)`.

    The modulation uses the beta-scaled `z`, as TRL (`discopop_tau`) and the final
    `log_ratio_modulated_loss` of the authors' code do; with the paper's beta = tau = 0.05 it
    reduces to `sigmoid(rho)`. `m * exp(-z)` is computed as `exp(log m - z)`: the same value,
    but it stays finite where exp(-z) overflows and m underflows to 0 (inf * 0 = nan in the
    direct form).
    """
    z = beta * log_ratio_margin(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    m = torch.sigmoid(z / tau)
    logistic = -F.logsigmoid(z)
    weighted_exp = torch.exp(F.logsigmoid(z / tau) - z)
    return (1 - m) * logistic + weighted_exp


def padll_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float = 0.05,
    base_decay: float = 0.9,
    mismatch_penalty: float = 0.5,
) -> Tensor:
    """PADLL (Lu et al. 2024): DPO loss weighted `base_decay * (1 - mismatch_penalty)` on pairs
    the implicit reward ranks wrongly (rho < 0) and `base_decay` on the others."""
    rho = log_ratio_margin(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    mismatch = (rho < 0).to(rho.dtype)
    weight = base_decay * (1 - mismatch_penalty * mismatch)
    return -weight * F.logsigmoid(beta * rho)


def cell_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float = 0.05,
    alpha: float = 0.5,
) -> Tensor:
    """CELL (Lu et al. 2024): `alpha * exp(-z) + (1 - alpha) * (-log sigmoid(z))`."""
    z = beta * log_ratio_margin(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    return alpha * torch.exp(-z) - (1 - alpha) * F.logsigmoid(z)


def pfl_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float = 0.05,
    focus_scale: float = 2.0,
) -> Tensor:
    """PFL (Lu et al. 2024): `-log sigmoid(z) / focus_scale` where the POLICY already prefers the
    chosen response (pc > pr, reference ignored), else `focus_scale * relu(1 - z)`."""
    z = beta * log_ratio_margin(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    correct = policy_chosen_logps > policy_rejected_logps
    return torch.where(correct, -F.logsigmoid(z) / focus_scale, torch.relu(1 - z) * focus_scale)


def genarm_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor | None = None,
    reference_rejected_logps: Tensor | None = None,
    beta_r: float = 1.0,
) -> Tensor:
    """GenARM (Xu et al. 2025) Bradley-Terry loss of an autoregressive reward model:
    `-log sigmoid(beta_r * (pc - pr))`. No reference model: the reference arguments are ignored."""
    return -F.logsigmoid(beta_r * (policy_chosen_logps - policy_rejected_logps))
