"""Fewer saved activations, same values: RMSNorm and SwiGLU MLP as autograd functions that save
only their inputs and recompute the cheap elementwise parts in backward.

A Llama-style decoder layer saves, per token, its RMSNorm's input *and* its normalized input
(the weight multiply keeps the second), and the MLP saves silu(gate) and silu(gate) * up beside
gate and up. None of those needs to stay: the normalized input is the input times one saved
scalar per token, and silu(gate) * up is recomputed from gate and up in a few elementwise ops,
against the matmuls that dominate a step. On SmolLM2-135M (hidden 576, MLP 1536) that is
4,224 of about 13,000 saved floats per token and layer.

`lean_activations(model)` swaps in these forwards for every module it recognises: an RMSNorm
with a `weight` of the hidden size and an epsilon (`variance_epsilon` or `eps`), and an MLP with
`gate_proj`, `up_proj`, `down_proj` and a SiLU `act_fn` (Llama, Mistral, Qwen2/3, SmolLM3,
OLMo-2, ...). Each candidate is checked on a random input against its own forward (values and
gradients) before it is swapped; anything else keeps its forward. Where `down_proj` is a plain
`nn.Linear` the down projection is folded into the MLP function, which then recomputes
silu(gate) * up for the weight gradient instead of saving it; a LoRA-wrapped `down_proj` saves
that product itself, so only silu(gate) is dropped there. Under autocast the plain forwards run.

The same idea as the fused, recomputing kernels of Liger-Kernel (Hsu et al., "Liger Kernel:
Efficient Triton Kernels for LLM Training", 2024), written in plain torch for any device.
"""

from __future__ import annotations

import types

import torch
from torch import nn
from torch.nn import functional as F

# The probe that recognises a module: a few rows of its hidden size, compared to its own forward
# within the rounding of the module's dtype.
PROBE_ROWS = 3
PROBE_TOL = {torch.float32: (1e-4, 1e-5), torch.float64: (1e-8, 1e-10)}
HALF_TOL = (3e-2, 1e-2)  # bf16, fp16


class _RMSNorm(torch.autograd.Function):
    """weight * (x * rsqrt(mean(x^2) + eps)) computed in fp32 and cast back, as Llama does;
    saves x and one scalar per row, not the normalized x."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        normed = x.float() * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normed.to(x.dtype)).reshape(-1, weight.shape[-1]).sum(0)
            grad_weight = grad_weight.to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            g = (grad * weight).float()
            grad_x = rstd * (g - normed * (g * normed).mean(-1, keepdim=True))
            grad_x = grad_x.to(x.dtype)
        return grad_x, grad_weight, None


def _silu_grad(gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """silu(gate) and its derivative sigmoid(g) * (1 + g * (1 - sigmoid(g)))."""
    sig = torch.sigmoid(gate)
    return gate * sig, sig * (1 + gate * (1 - sig))


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up, saving gate and up only."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        act, act_grad = _silu_grad(gate)
        return grad * up * act_grad, grad * act


class _SwiGLUDown(torch.autograd.Function):
    """down(silu(gate) * up) for a plain linear `down`, saving gate and up only: the product is
    recomputed in backward for the weight gradient."""

    @staticmethod
    def forward(ctx, gate, up, weight, bias):
        ctx.save_for_backward(gate, up, weight)
        ctx.has_bias = bias is not None
        return F.linear(F.silu(gate) * up, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up, weight = ctx.saved_tensors
        act, act_grad = _silu_grad(gate)
        grad_weight = grad_bias = None
        flat = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[2]:
            grad_weight = flat.t() @ (act * up).reshape(-1, up.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = flat.sum(0)
        grad_hidden = grad @ weight
        return grad_hidden * up * act_grad, grad_hidden * act, grad_weight, grad_bias


def _autocasting(x: torch.Tensor) -> bool:
    return torch.is_autocast_enabled(x.device.type)


def _lean_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if _autocasting(hidden_states):
        return self._plain_forward(hidden_states)
    return _RMSNorm.apply(hidden_states, self.weight, self._lean_eps)


def _lean_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    if _autocasting(x):
        return self._plain_forward(x)
    gate, up = self.gate_proj(x), self.up_proj(x)
    down = self.down_proj
    # Its weight is read here, not through its forward: only a plain linear nothing hooks (an
    # FSDP unit of its own would still hold a shard).
    if type(down) is nn.Linear and not (down._forward_hooks or down._forward_pre_hooks):
        return _SwiGLUDown.apply(gate, up, down.weight, down.bias)
    return down(_SwiGLU.apply(gate, up))


def _norm_eps(module: nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps"):
        eps = getattr(module, name, None)
        if isinstance(eps, float):
            return eps
    return None


def _is_rmsnorm_candidate(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        "rmsnorm" in type(module).__name__.lower()
        and isinstance(weight, nn.Parameter)
        and weight.dim() == 1
        and _norm_eps(module) is not None
        and not list(module.children())
    )


def _is_swiglu_candidate(module: nn.Module) -> bool:
    return (
        all(
            isinstance(getattr(module, name, None), nn.Module)
            for name in ("gate_proj", "up_proj", "down_proj")
        )
        and "silu" in type(getattr(module, "act_fn", None)).__name__.lower()
    )  # torch's or HF's


def _hidden_size(module: nn.Module) -> int | None:
    if _is_rmsnorm_candidate(module):
        return module.weight.shape[0]
    weight = getattr(module.gate_proj, "weight", None)
    if weight is None and hasattr(module.gate_proj, "base_layer"):  # peft LoRA
        weight = getattr(module.gate_proj.base_layer, "weight", None)
    return weight.shape[1] if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None


def _same_as_plain(module: nn.Module, lean: types.MethodType) -> bool:
    """Whether `lean` gives the module's own forward values and gradients on a random input
    (each compared normwise: the largest difference against the largest value)."""
    hidden = _hidden_size(module)
    params = [p for p in module.parameters() if p.requires_grad]
    if hidden is None or any(p.device.type == "meta" for p in module.parameters()):
        return False
    reference = next(module.parameters())
    generator = torch.Generator(device="cpu").manual_seed(0)
    probe = torch.randn(PROBE_ROWS, hidden, generator=generator).to(reference)
    results = []
    for forward in (module.forward, lean):
        x = probe.clone().requires_grad_(True)
        with torch.enable_grad(), torch.autocast(reference.device.type, enabled=False):
            out = forward(x)
            weights = torch.randn(out.shape, generator=generator.manual_seed(1)).to(out)
            grads = torch.autograd.grad((out * weights).sum(), [x, *params])
        results.append((out.detach(), *grads))
    rtol, atol = PROBE_TOL.get(reference.dtype, HALF_TOL)
    return all(
        float((a.float() - b.float()).abs().max()) <= rtol * float(b.float().abs().max()) + atol
        for a, b in zip(*results, strict=True)
    )


def lean_activations(model: nn.Module) -> int:
    """Swap the lean forward into every recognised RMSNorm and SwiGLU MLP of `model` (checked
    against its own forward first); returns how many modules were swapped."""
    swapped = 0
    for module in model.modules():
        if getattr(module, "_plain_forward", None) is not None:
            continue  # already lean
        if _is_rmsnorm_candidate(module):
            module._lean_eps = _norm_eps(module)
            lean = types.MethodType(_lean_norm_forward, module)
        elif _is_swiglu_candidate(module):
            lean = types.MethodType(_lean_mlp_forward, module)
        else:
            continue
        module._plain_forward = module.forward
        if _same_as_plain(module, lean):
            module.forward = lean
            swapped += 1
        else:
            del module._plain_forward
            module.__dict__.pop("_lean_eps", None)
    return swapped
