"""The optimizer step of each parameter inside backward, as soon as its gradient is complete.

A parameter's gradient is final when autograd accumulates it (`register_post_accumulate_grad_hook`:
every use of the tensor, tied weights included, has contributed by then). Stepping that
parameter at once and dropping its gradient means the whole model's gradients are never alive
together: peak memory falls by one copy of the trained parameters. The update is the plain
step's exactly (AdamW is elementwise per tensor), but only when
nothing needs all gradients first: no global gradient-norm clipping, no accumulation over
micro-batches, one process (DDP reduces gradients after this hook would fire), no fp16 loss
scaling and no sharding. `fits` says whether a run qualifies. This is the fused
optimizer-in-backward pattern of PyTorch's tutorial "How to save memory by fusing the optimizer
step into the backward pass" (Lee, 2023) applied to the run's own optimizer, so the learning-rate
schedule and the optimizer's checkpoint state are unchanged.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch


def fits(
    max_grad_norm: float, grad_accum: int, num_processes: int, mixed_precision: str, sharded: bool
) -> bool:
    """Whether stepping inside backward equals the step after backward for this run."""
    return (
        max_grad_norm == 0
        and grad_accum == 1
        and num_processes == 1
        and mixed_precision != "fp16"
        and not sharded
    )


class StepInBackward:
    """Hooks that step each parameter of `optimizer` when its gradient is complete.

    Each parameter gets a shallow copy of `optimizer` holding one group of that one tensor and
    sharing `optimizer.state`, so the run's optimizer keeps the state (checkpoints, resume) and its
    learning-rate schedule, copied into the parameter's group before its step. (Calling the run
    optimizer's own `step()` per parameter would also be exact, but scans every parameter on
    each call: 0.7 s a step for 272 tensors.) Every gradient is checked before its parameter
    moves: a non-finite one calls `on_non_finite(norm)`, which must raise (the parameters
    stepped earlier in this backward pass have moved in memory; the run stops before anything
    is saved). `grad_norm()` is the global L2 norm of the last backward's gradients, as
    clipping would have measured it.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        on_non_finite: Callable[[float], None],
    ) -> None:
        self.on_non_finite = on_non_finite
        self.squares: list[torch.Tensor] = []
        self.single: dict[torch.Tensor, tuple[torch.optim.Optimizer, dict]] = {}
        self.handles = []
        for group in optimizer.param_groups:
            for param in group["params"]:
                single = copy.copy(optimizer)  # the same class, defaults and state
                single.param_groups = [{**group, "params": [param]}]
                self.single[param] = (single, group)
                self.handles.append(param.register_post_accumulate_grad_hook(self._step))

    def _step(self, param: torch.Tensor) -> None:
        norm = torch.linalg.vector_norm(param.grad.detach(), dtype=torch.float32)
        if not math.isfinite(float(norm)):
            self.on_non_finite(float(norm))
        self.squares.append(norm.square())
        single, group = self.single[param]
        single.param_groups[0].update((k, v) for k, v in group.items() if k != "params")
        single.step()
        param.grad = None

    def step_parameter(self, param: torch.Tensor) -> None:
        """Step `param` now, its gradient complete (bf16 working weights call this for their
        fp32 masters, whose gradients autograd does not accumulate)."""
        self._step(param)

    def grad_norm(self) -> float:
        """The norm over the gradients of the last backward pass; resets for the next one."""
        total = float(torch.stack(self.squares).sum().sqrt()) if self.squares else 0.0
        self.squares = []
        return total

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
