"""One fused pass for the optimizer step of bf16 working weights with fp32 masters.

The plain step of the master-weights scheme makes four passes over the model's memory: each
bf16 gradient is converted into a new fp32 master gradient, clipping reads those gradients for
their norm and multiplies them, AdamW reads and writes master, gradient and both moments, and
the bf16 working weights are refreshed from the masters. At SmolLM2-135M that is ~0.4 CPU-s a
step on one core whatever the batch, memory-bound. Here the bf16 gradients stay on the working
weights and the step walks the parameters in cache-sized chunks: a chunk's gradient is widened
into a small reused fp32 buffer (so no fp32 gradient of the whole model is ever allocated),
scaled by the clipping coefficient, stepped with torch's fused AdamW kernel, and rounded into the
bf16 working weight while it is still in cache. The gradient norm takes one read of the bf16
gradients. The arithmetic is the plain step's: the same widening (exact), the same clipping
coefficient, the same AdamW kernel per element, the same rounding to bf16; only the gradient
norm's summation order differs. Optimizer state keeps torch AdamW's layout, so checkpoints are
interchangeable with the plain step's. (The chunked pass is the loop-blocking idea of
mixed-precision optimizers such as Micikevicius et al., "Mixed Precision Training", 2018,
done with stock kernels.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

# Elements per chunk: a chunk's master, moments, fp32 gradient and bf16 copies (~1.3 MB) stay
# in a core's L2 cache between the kernels that touch them.
CHUNK_ELEMENTS = 2**16


def bf16_grad_norm(grads: Sequence[torch.Tensor], chunk: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """The L2 norm of `grads` (bf16) summed in fp32, without an fp32 copy of any whole tensor."""
    scratch = torch.empty(chunk, dtype=torch.float32, device=grads[0].device if grads else "cpu")
    total = torch.zeros((), dtype=torch.float32, device=scratch.device)
    for grad in grads:
        flat = grad.detach().reshape(-1)
        for start in range(0, flat.numel(), chunk):
            part = scratch[: min(chunk, flat.numel() - start)].copy_(flat[start : start + chunk])
            total += torch.dot(part, part)
    return total.sqrt()


def clip_coefficient(norm: float, max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_'s factor: max_norm / (norm + 1e-6), at most 1 (no clipping
    for a max_norm of 0 or infinity)."""
    if not max_norm or math.isinf(max_norm):
        return 1.0
    return min(1.0, max_norm / (norm + 1e-6))


def adamw_state(optimizer: torch.optim.Optimizer, master: torch.Tensor) -> dict:
    """The AdamW state of `master`, created as torch's fused AdamW creates it."""
    state = optimizer.state[master]
    if not state:
        state["step"] = torch.zeros((), dtype=torch.float32, device=master.device)
        state["exp_avg"] = torch.zeros_like(master, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(master, memory_format=torch.preserve_format)
    return state


def pieces(tensors: Sequence[torch.Tensor], chunk: int):
    """Aligned flat chunks of same-shaped contiguous tensors (one piece each if any is strided:
    its flat view would not be a view)."""
    if not all(t.is_contiguous() for t in tensors):
        yield tensors
        return
    flat = [t.view(-1) for t in tensors]
    for start in range(0, flat[0].numel(), chunk):
        yield [t[start : start + chunk] for t in flat]


@torch.no_grad()
def step_masters(
    optimizer: torch.optim.Optimizer,
    masters: Sequence[torch.Tensor],
    working: Sequence[torch.Tensor],
    clip: float = 1.0,
    chunk: int = CHUNK_ELEMENTS,
) -> None:
    """AdamW-step each fp32 master from its bf16 working weight's gradient times `clip`, and
    round the result into the working weight; the working gradients are dropped as they are
    used. `optimizer` is the torch AdamW over `masters` (its groups give the hyperparameters and
    the learning rate, its state the moments). Masters without a gradient are not stepped."""
    to_working = dict(zip(map(id, masters), working, strict=True))
    scratch = None
    for group in optimizer.param_groups:
        if group.get("amsgrad") or group.get("maximize"):
            raise NotImplementedError("the fused bf16 master step has no amsgrad or maximize")
        beta1, beta2 = group["betas"]
        hyper = dict(
            lr=float(group["lr"]),
            beta1=beta1,
            beta2=beta2,
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            amsgrad=False,
            maximize=False,
        )
        for master in group["params"]:
            weight = to_working[id(master)]
            if weight.grad is None:
                continue
            if scratch is None:
                scratch = torch.empty(chunk, dtype=torch.float32, device=master.device)
            state = adamw_state(optimizer, master)
            state["step"] += 1
            tensors = (master, weight.grad, state["exp_avg"], state["exp_avg_sq"], weight)
            for p, g, m, v, w in pieces(tensors, chunk):
                g32 = scratch[: g.numel()].copy_(g) if g.dim() == 1 else g.float()
                if clip != 1.0:
                    g32.mul_(clip)
                torch._fused_adamw_([p], [g32], [m], [v], [], [state["step"]], **hyper)
                w.copy_(p)
            weight.grad = None
