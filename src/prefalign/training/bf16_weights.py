"""bf16 working weights with fp32 master weights: mixed precision without per-op casts.

The model's parameters are cast to bf16 once; each trainable one keeps an fp32 master copy that
the optimizer updates. Forward and backward run entirely in bf16 (no autocast, so no weight is
re-cast on every forward and no activation is cast back and forth), each micro-batch's bf16
gradient is added into the master's fp32 gradient as soon as autograd has accumulated it, and
after every optimizer step the bf16 weights are refreshed from the masters in one fused copy.
Where the step follows backward without accumulation over micro-batches (the default), the bf16
gradients stay on the working weights instead, and clipping, AdamW and the refresh run as one
chunked pass over them (`prefalign.training.master_step`): no fp32 gradient is ever allocated.
Rounding a weight to bf16 therefore never loses an update: small steps accumulate in fp32.
This is the master-weights scheme of Micikevicius et al., "Mixed Precision Training" (ICLR 2018),
with bf16 (no loss scaling needed). Buffers (rotary frequencies) stay fp32, and prefalign's
log-probs keep their fp32 log-sum-exp, so the loss is computed in fp32.

Where the trainer steps inside backward (no clipping, no accumulation), each master steps as
soon as its gradient is complete and its bf16 weight is refreshed at once, so the fp32
gradients of the whole model are never alive together. Frozen parameters (a LoRA model's base,
a frozen embedding) are held in bf16 only: they never change, so they need no master.
Single-process runs only: DDP and FSDP2 all-reduce or shard the parameters' own gradients,
which this scheme moves to the masters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from prefalign.training.master_step import bf16_grad_norm, step_masters

WORKING_DTYPE = torch.bfloat16


class Bf16MasterWeights:
    """Casts `model`'s floating-point parameters to bf16 in place and keeps fp32 masters of the
    trainable ones; give `masters` to the optimizer and call `refresh()` after each step."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.working: list[torch.nn.Parameter] = []
        self.masters: list[torch.nn.Parameter] = []
        # Set to step one master as soon as its gradient is complete (the optimizer step inside
        # backward, `prefalign.training.step_in_backward`); its bf16 weight is refreshed at once.
        self.step_master: Callable[[torch.nn.Parameter], None] | None = None
        # Set where the optimizer steps after backward without accumulation: each bf16
        # gradient stays on its working weight for `step` (no fp32 gradient is ever made).
        self.keep_bf16_grads = False
        seen: set[int] = set()
        for param in model.parameters():  # a tied weight is one Parameter: seen once
            if id(param) in seen or not param.is_floating_point():
                continue
            seen.add(id(param))
            if param.requires_grad:
                master = torch.nn.Parameter(param.detach().float().clone())
                self.working.append(param)
                self.masters.append(master)
                param.register_post_accumulate_grad_hook(self._to_master(master))
            with torch.no_grad():
                param.data = param.data.to(WORKING_DTYPE)

    def _to_master(self, master: torch.nn.Parameter):
        def hook(param: torch.nn.Parameter) -> None:
            if self.keep_bf16_grads:
                return
            # fp32 accumulation across micro-batches; the bf16 gradient is freed at once.
            grad = param.grad.to(torch.float32)
            master.grad = grad if master.grad is None else master.grad.add_(grad)
            param.grad = None
            if self.step_master is not None:  # stepping inside backward: this master now
                self.step_master(master)
                with torch.no_grad():
                    param.copy_(master)

        return hook

    def grad_norm(self) -> float:
        """The L2 norm of the working weights' bf16 gradients (with `keep_bf16_grads`)."""
        grads = [p.grad for p in self.working if p.grad is not None]
        return float(bf16_grad_norm(grads)) if grads else 0.0

    def step(self, optimizer: torch.optim.Optimizer, clip: float = 1.0) -> None:
        """AdamW-step the masters from the bf16 gradients times `clip` and refresh the bf16
        weights, in one chunked pass (`prefalign.training.master_step`)."""
        step_masters(optimizer, self.masters, self.working, clip)

    @torch.no_grad()
    def refresh(self) -> None:
        """Round the fp32 masters into the bf16 working weights (after an optimizer step)."""
        if self.working:
            torch._foreach_copy_(self.working, self.masters)

    @contextlib.contextmanager
    def fp32_parameters(self) -> Iterator[None]:
        """The trainable parameters are their fp32 masters inside the block (saving and loading
        checkpoints); on leaving, the bf16 weights are refreshed from the masters."""
        held = [p.data for p in self.working]
        for param, master in zip(self.working, self.masters, strict=True):
            param.data = master.data
        try:
            yield
        finally:
            for param, data in zip(self.working, held, strict=True):
                param.data = data
            self.refresh()
