"""Run under torchrun (2 processes, gloo): shard a tiny Llama and its soft trust-region
reference with FSDP2, profile one reference update, and check it is local and correct."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.profiler import profile

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from conftest import tiny_llama_config  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from prefalign.reference import ReferenceSpec, make_reference  # noqa: E402
from prefalign.training.fsdp import local_tensor, shard_with_reference  # noqa: E402

COMMUNICATION = ("all_gather", "allgather", "c10d", "gloo", "reduce_scatter", "broadcast")


def communicating(prof) -> list[str]:
    return sorted(
        {e.name for e in prof.events() if any(c in e.name.lower() for c in COMMUNICATION)}
    )


def make_reference_sharded(spec: ReferenceSpec):
    """A sharded tiny policy moved away from its sharded reference, shard by shard."""
    torch.manual_seed(0)
    policy = LlamaForCausalLM(tiny_llama_config())
    reference = make_reference(policy, spec)
    shard_with_reference(policy, reference)
    with torch.no_grad():
        for p in policy.parameters():
            local_tensor(p).add_(1.0)
    return policy, reference


def main() -> None:
    dist.init_process_group("gloo")
    policy, reference = make_reference_sharded(ReferenceSpec(mode="soft", alpha=0.25))
    before = {n: local_tensor(p).clone() for n, p in reference.model.named_parameters()}
    target = {n: local_tensor(p).clone() for n, p in policy.named_parameters()}
    with profile() as prof:
        assert reference.after_optimizer_step(1)
    assert communicating(prof) == [], communicating(prof)
    for name, p in reference.model.named_parameters():
        expected = 0.25 * target[name] + 0.75 * before[name]
        torch.testing.assert_close(local_tensor(p), expected, msg=name)
        assert local_tensor(p).numel() < p.numel()  # a shard, not the whole tensor
    # Positive control: the reference's forward gathers its shards, and the profiler sees it.
    ids = torch.randint(4, 20, (2, 6))
    with profile() as prof, torch.no_grad():
        gathered = reference.model(input_ids=ids).logits
    assert communicating(prof), "the profiler should see the forward's all-gathers"
    # The reference's forward reads the updated shards (its root is not left gathered).
    with profile(), torch.no_grad():
        assert reference.after_optimizer_step(2)
        again = reference.model(input_ids=ids).logits
    assert not torch.allclose(gathered, again)
    # A hard reference copies the policy's shards, locally as well.
    hard = make_reference_sharded(ReferenceSpec(mode="hard", tau=1))
    with profile() as prof:
        assert hard[1].after_optimizer_step(1)
    assert communicating(prof) == [], communicating(prof)
    for (name, ref), pol in zip(
        hard[1].model.named_parameters(), hard[0].parameters(), strict=True
    ):
        torch.testing.assert_close(local_tensor(ref), local_tensor(pol), msg=name)
    print(f"rank {dist.get_rank()}: local update ok")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
