"""Mixing LoRA weight updates: the soft trust-region update of a LoRA reference.

A LoRA layer adds `s * B @ A` to a frozen weight. The soft update of TR-DPO (Gorbatovski et al.,
"Learn Your Reference Model for Real Good Alignment", 2024) mixes weights,
`W_ref <- a*W + (1-a)*W_ref`; with a shared frozen base that is `D_ref <- a*D + (1-a)*D_ref`
for the updates D = s*B@A. Mixing the factors instead, `(a*B + (1-a)*B_ref)(a*A + (1-a)*A_ref)`,
is a different matrix (a policy (-A, -B), the same function as a reference (A, B), would mix
to the bare base at a = 0.5).

The exact mixture of a rank-r and a rank-R update has rank up to r + R, so the reference
adapter keeps a rank-R factorization: the two factor pairs are stacked, `[a*B, (1-a)*B_ref]`
times `[A; A_ref]`, which is the mixture exactly, and recompressed through QR of each stack
and an SVD of the small (r+R) x (r+R) core. Truncation rule: keep the R largest singular
directions (Eckart-Young: the best rank-R approximation in Frobenius norm); the mixture is
exact whenever its rank is at most R, and the dropped share of its Frobenius norm is reported.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def mix_factors_(
    a_ref: torch.Tensor, b_ref: torch.Tensor, a: torch.Tensor, b: torch.Tensor, weight: float
) -> float:
    """Set `b_ref @ a_ref` (shapes [out, R] and [R, in]) to the best rank-R approximation of
    `weight * b @ a + (1 - weight) * b_ref @ a_ref`, in place. Returns the dropped share of the
    mixture's Frobenius norm (0.0 when it is exact)."""
    rank = a_ref.shape[0]
    dtype = torch.float64  # the factors are small: recompress at double precision
    b_stack = torch.cat([weight * b.to(dtype), (1 - weight) * b_ref.to(dtype)], dim=1)
    a_stack = torch.cat([a.to(dtype), a_ref.to(dtype)], dim=0)
    q_b, r_b = torch.linalg.qr(b_stack)  # [out, k], [k, r+R]
    q_a, r_a = torch.linalg.qr(a_stack.T)  # [in, k'], [k', r+R]
    u, sigma, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)  # the mixture is q_b @ core @ q_a.T
    keep = min(rank, sigma.shape[0])
    root = sigma[:keep].sqrt()  # split the singular values evenly between the factors
    new_b = torch.zeros_like(b_ref, dtype=dtype)
    new_a = torch.zeros_like(a_ref, dtype=dtype)
    new_b[:, :keep] = (q_b @ u[:, :keep]) * root
    new_a[:keep] = root[:, None] * (vh[:keep] @ q_a.T)
    b_ref.copy_(new_b)
    a_ref.copy_(new_a)
    total = float(sigma.square().sum())
    return (float(sigma[keep:].square().sum()) / total) ** 0.5 if total > 0 else 0.0


@torch.no_grad()
def copy_factors_(a_ref: torch.Tensor, b_ref: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """Set `b_ref @ a_ref` to `b @ a` exactly: the policy's factors in the first r slots."""
    r = a.shape[0]
    a_ref.zero_()
    b_ref.zero_()
    a_ref[:r].copy_(a)
    b_ref[:, :r].copy_(b)
