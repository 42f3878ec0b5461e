"""The memory floor of a training step: what must be resident at the end of backward.

However a trainer handles activations, an exact AdamW step needs, alive together at the end of
backward: the weights (a LoRA model's frozen base and adapters included), Adam's two moments, the
fp32 masters of bf16 working weights, a trust-region reference's weights where one is held, and
the gradients. With gradient-norm clipping every trained tensor's gradient is alive at once (the
global norm is needed before any parameter may step); without it each parameter can step inside
backward as soon as its gradient is complete (PyTorch's optimizer-in-backward recipe), so only
the largest single gradient must be. Adding the process's own resident memory before the model
(interpreter, libraries, data) gives the peak no implementation of that algorithm goes below.

Every figure is counted from live tensors, each storage once: a tied embedding, a view, or a
LoRA base that the policy and its reference adapter share are one storage. A gradient has its
parameter's shape and dtype (autograd's contract), so gradients are sized from the trained
parameters even between steps, when they have been freed.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable, Iterator
from typing import Any

import torch

PARTS = ("reference", "weights", "masters", "optimizer", "gradients")


def _local(t: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) tensor's local shard: the bytes this process holds."""
    return getattr(t, "_local_tensor", t)


def storage_of(t: torch.Tensor) -> tuple[int, int]:
    """(address, bytes) of the storage under `t`: views of one storage share the address."""
    storage = _local(t).untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def tensors_in(obj: Any) -> Iterator[torch.Tensor]:
    """The tensors in a module (parameters and buffers), an optimizer (its state), a tensor, or a
    dict / list / tuple of those."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, torch.nn.Module):
        yield from obj.parameters()
        yield from obj.buffers()
    elif isinstance(obj, torch.optim.Optimizer):
        for state in obj.state.values():
            yield from tensors_in(state)
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from tensors_in(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from tensors_in(value)


def base_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer under wrappers (accelerate's AcceleratedOptimizer)."""
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def state_floor(
    model: torch.nn.Module,
    optimizer: Any,
    reference: Any = (),
    clipping: bool = True,
) -> dict[str, int]:
    """Bytes by part (PARTS) that an exact AdamW step on `model` must hold at the end of backward.

    `reference`: the reference's own tensors where it holds any (a module, a dict of tensors: a
    LoRA reference adapter inside `model` counts as reference, not weights); `clipping`: whether
    every gradient must be alive at once (else only the largest). The optimizer's parameters that
    are not the model's own (fp32 masters of bf16 weights) count as masters, its state (moments,
    step counters) as optimizer.
    """
    optimizer = base_optimizer(optimizer)
    seen: set[int] = set()

    def count(tensors: Iterable[torch.Tensor]) -> int:
        total = 0
        for t in tensors:
            address, nbytes = storage_of(t)
            if address not in seen and nbytes:
                seen.add(address)
                total += nbytes
        return total

    masters = [p for group in optimizer.param_groups for p in group["params"]]
    parts = {
        "reference": count(tensors_in(reference)),
        "weights": count(tensors_in(model)),
        "masters": count(masters),
        "optimizer": count(tensors_in(optimizer)),
    }
    trained: dict[int, int] = {}  # storage -> bytes of its gradient
    for p in model.parameters():
        if p.requires_grad:
            address, _ = storage_of(p)
            trained[address] = _local(p).numel() * p.element_size()
    grads = list(trained.values())
    parts["gradients"] = (sum(grads) if clipping else max(grads)) if grads else 0
    return parts


def live_tensors() -> list[torch.Tensor]:
    """Every Python tensor object alive in the process."""
    # type(), not isinstance(): isinstance reads __class__, which warns on deprecated proxies.
    return [obj for obj in gc.get_objects() if issubclass(type(obj), torch.Tensor)]


def live_tensor_storages() -> dict[int, int]:
    """address -> bytes of every storage under a live Python tensor or its gradient, found by the
    garbage collector (what is actually allocated, whatever holds it)."""
    found: dict[int, int] = {}
    for obj in live_tensors():
        if obj.is_meta:
            continue
        for t in (obj, obj.grad if obj.is_leaf else None):
            if t is not None:
                address, nbytes = storage_of(t)
                if nbytes:
                    found[address] = nbytes
    return found


def trainer_floor(trainer: Any) -> dict[str, int]:
    """`state_floor` of a prefalign `Trainer` (one process): its model, optimizer and the
    reference it checkpoints (`extra_state`: a trust-region or live frozen reference's weights;
    none for a frozen reference read through its log-prob cache)."""
    reference = trainer.extra_state
    weights = reference.state_dict()["weights"] if reference is not None else {}
    config = trainer.config
    clipping = config.max_grad_norm > 0 or config.grad_accum > 1
    return state_floor(trainer.unwrapped, trainer.adamw, weights, clipping)
