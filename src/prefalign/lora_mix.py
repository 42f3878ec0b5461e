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

Under FSDP2 the factors are sharded by rows, and neither QR nor SVD splits by rows of only one
factor, so the update gathers each layer's four factors whole (adapter-sized: a few MB where
the model is hundreds), mixes them as above on every process, and each process keeps its own
rows of process 0's result, so all shards come from one factorization (the SVD's signs and
order are the same everywhere).
"""

from __future__ import annotations

import torch

from prefalign.training.fsdp import full_tensor, load_full_


@torch.no_grad()
def mix_factors_(
    a_ref: torch.Tensor, b_ref: torch.Tensor, a: torch.Tensor, b: torch.Tensor, weight: float
) -> torch.Tensor:
    """Set `b_ref @ a_ref` (shapes [..., out, R] and [..., R, in]: one layer, or a batch of
    layers of one shape) to the best rank-R approximation of
    `weight * b @ a + (1 - weight) * b_ref @ a_ref`, in place. Returns the dropped share of each
    mixture's Frobenius norm (0 where it is exact), shape [...]."""
    rank = a_ref.shape[-2]
    dtype = torch.float64  # the factors are small: recompress at double precision
    b_stack = torch.cat([weight * b.to(dtype), (1 - weight) * b_ref.to(dtype)], dim=-1)
    a_stack = torch.cat([a.to(dtype), a_ref.to(dtype)], dim=-2)
    q_b, r_b = torch.linalg.qr(b_stack)  # [out, k], [k, r+R]
    q_a, r_a = torch.linalg.qr(a_stack.mT)  # [in, k'], [k', r+R]
    u, sigma, vh = torch.linalg.svd(r_b @ r_a.mT, full_matrices=False)  # mixture: q_b core q_a^T
    keep = min(rank, sigma.shape[-1])
    root = sigma[..., :keep].sqrt()  # split the singular values evenly between the factors
    new_b = torch.zeros_like(b_ref, dtype=dtype)
    new_a = torch.zeros_like(a_ref, dtype=dtype)
    new_b[..., :keep] = (q_b @ u[..., :keep]) * root[..., None, :]
    new_a[..., :keep, :] = root[..., :, None] * (vh[..., :keep, :] @ q_a.mT)
    b_ref.copy_(new_b)
    a_ref.copy_(new_a)
    total = sigma.square().sum(-1)
    dropped = sigma[..., keep:].square().sum(-1)
    return torch.where(total > 0, dropped / total.clamp(min=1e-300), 0.0).sqrt()


@torch.no_grad()
def mix_layers_(layers: list[tuple[torch.Tensor, ...]], weight: float) -> float:
    """`mix_factors_` over many layers, each (A_ref, B_ref, A, B), batched by shape: one QR and
    one SVD call per shape instead of per layer. Returns the largest dropped share."""
    groups: dict[tuple, list[tuple[torch.Tensor, ...]]] = {}
    for layer in layers:
        groups.setdefault(tuple((t.shape, t.dtype, t.device) for t in layer), []).append(layer)
    worst = 0.0
    for members in groups.values():
        a_ref, b_ref, a, b = (torch.stack(tensors) for tensors in zip(*members, strict=True))
        dropped = mix_factors_(a_ref, b_ref, a, b, weight)
        torch._foreach_copy_([m[0] for m in members], list(a_ref.unbind(0)))
        torch._foreach_copy_([m[1] for m in members], list(b_ref.unbind(0)))
        worst = max(worst, float(dropped.max()))
    return worst


@torch.no_grad()
def copy_factors_(
    a_ref: torch.Tensor, b_ref: torch.Tensor, a: torch.Tensor, b: torch.Tensor
) -> None:
    """Set `b_ref @ a_ref` to `b @ a` exactly: the policy's factors in the first r slots."""
    r = a.shape[0]
    a_ref.zero_()
    b_ref.zero_()
    a_ref[:r].copy_(a)
    b_ref[:, :r].copy_(b)


@torch.no_grad()
def mix_sharded_layers_(layers: list[tuple[torch.Tensor, ...]], weight: float) -> float:
    """`mix_layers_` on sharded (DTensor) factors: gathered whole, mixed, and each process's
    reference shards set from process 0's mixture. Collectives: call on every process."""
    whole = [tuple(full_tensor(t).clone() for t in layer) for layer in layers]
    worst = mix_layers_(whole, weight)
    for layer, mixed in zip(layers, whole, strict=True):
        for sharded, full in zip(layer[:2], mixed[:2], strict=True):  # A_ref, B_ref
            load_full_(sharded, full, src_rank=0)
    return worst
