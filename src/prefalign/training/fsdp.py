"""FSDP2 (PyTorch's per-parameter `fully_shard`) for the policy and a full-model reference.

Every decoder layer is one FSDP unit and the model root another, so a process holds 1/N of
the parameters, gradients and optimizer state and gathers one layer's weights at a time in
forward and backward. A full-copy trust-region reference is sharded the same way, so its soft
update `theta_ref <- alpha*theta + (1-alpha)*theta_ref` (or hard copy) runs on each process's
local shards with no communication: policy and reference shards of one parameter cover the
same slice on every process. A LoRA policy is sharded as it is (frozen base and adapters in
the same units); its reference adapter lives on the same sharded modules.

On CPU, accelerate's FSDP plugin does not engage (it falls back to data parallel), so the
training command applies `fully_shard` itself once the gloo process group exists; on GPUs the
same code runs on a CUDA mesh (see the README's "Multi-process and clusters"). Zhao et al.,
"PyTorch FSDP: Experiences on Scaling Fully Sharded Data Parallel" (2023) describe the scheme.

Checkpoints gather the shards into the ordinary single-process files (a Hugging Face model, a
full optimizer state keyed by parameter name), so `final` loads as a plain model; on resume
every process reads the full tensors and keeps its own slice of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.distributed.fsdp import FSDPModule, fully_shard

from prefalign.errors import UserError
from prefalign.modeling import is_peft_model

if TYPE_CHECKING:
    from prefalign.reference import ReferencePolicy


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a Hugging Face model (its `_no_split_modules` classes)."""
    inner = model.get_base_model() if is_peft_model(model) else model
    names = set(getattr(inner, "_no_split_modules", None) or [])
    layers = [m for m in inner.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"{type(inner).__name__} declares no decoder-layer class (_no_split_modules) "
            "to shard by"
        )
    return layers


def shard(model: torch.nn.Module, mesh=None, reshard_root: bool | None = None) -> torch.nn.Module:
    """Shard `model` in place over `mesh` (default: every process of the default group).

    `reshard_root=True` frees the root's gathered weights after every forward. A model trained
    with backward needs no such thing (backward reshards), but a forward-only reference does:
    left gathered, its root would keep reading the gathered copy, not the updated shards.
    """
    if not torch.distributed.is_initialized():
        raise UserError(
            "trainer.fsdp=true needs several processes: launch with torchrun --nproc_per_node N "
            "(or accelerate launch)"
        )
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        device = "cuda" if torch.cuda.is_available() else "cpu"
        mesh = init_device_mesh(device, (torch.distributed.get_world_size(),))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_root)
    return model


def shard_with_reference(model: torch.nn.Module, reference: ReferencePolicy) -> torch.nn.Module:
    """Shard the policy, and a full-copy reference the same way (a LoRA reference adapter is
    inside the policy already); the reference is re-paired with the sharded parameters."""
    shard(model)
    if (copy := reference.separate_model()) is not None:
        shard(copy, reshard_root=True)
    reference.rebind(model)
    return model


def local_fraction(model: torch.nn.Module) -> tuple[int, int]:
    """(parameter elements stored on this process, elements of the whole model)."""
    local = sum(local_tensor(p).numel() for p in model.parameters())
    return local, sum(p.numel() for p in model.parameters())


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor; a plain tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


def local_norm_to_float(norm: torch.Tensor) -> float:
    """A gradient norm as a float; a DTensor norm (sharded gradients) is reduced first."""
    full = getattr(norm, "full_tensor", None)
    return float(full() if full is not None else norm)


def load_full_(tensor: torch.Tensor, full: torch.Tensor, src_rank: int | None = None) -> None:
    """Set `tensor` to the whole tensor `full`, in place. A DTensor keeps its own slice: with
    `src_rank=None` every process cuts it from its own `full` (the same file read everywhere: no
    communication); with `src_rank=r` the slices come from process r's `full` (a scatter), for
    values computed on each process that must agree bit for bit."""
    with torch.no_grad():
        if not is_dtensor(tensor):
            tensor.copy_(full)
            return
        from torch.distributed.tensor import distribute_tensor

        full = full.to(device=tensor.to_local().device, dtype=tensor.dtype)
        mine = distribute_tensor(
            full, tensor.device_mesh, tensor.placements, src_data_rank=src_rank
        ).to_local()
        tensor.to_local().copy_(mine)


def is_dtensor(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole (a collective: call on every process); a plain tensor as it is."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state gathered in full on CPU, keyed by parameter name, on process 0
    (empty elsewhere); a collective: call on every process."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def load_full_optimizer_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict
) -> None:
    """Load a `full_optimizer_state` (read by every process): each keeps its own slices."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(
        model, optimizer, state, options=StateDictOptions(full_state_dict=True)
    )


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer gathered in full on CPU; a collective: call on every process."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
