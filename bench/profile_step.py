"""Where one soft trust-region DPO step's CPU time goes: a torch.profiler table.

    .venv/bin/python bench/profile_step.py [--pairs 4]

SmolLM2-135M-Instruct, smol-chat pairs (train_throughput's chat shape) in shared-prompt rows,
1 thread: the policy forward, the reference forward (no autograd), backward, clipping, fused
AdamW and the soft update (alpha 0.6), each under its own `record_function` label, after one
warm-up step. Prints the operators by self CPU time (which SDPA kernel runs shows here) and the
labelled phases' totals; writes nothing.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from levers import batches

    from prefalign.modeling import load_model, load_tokenizer
    from prefalign.models import SMOLLM2, resolve_model_source
    from prefalign.objectives import compute_loss, get
    from prefalign.reference import ReferenceSpec, make_reference
    from prefalign.shared_prompt import pair_logps

    random.seed(0)
    source = resolve_model_source(SMOLLM2)
    tokenizer, policy = load_tokenizer(source), load_model(source, device="cpu").train()
    _, batch = batches(tokenizer, "chat", args.pairs)
    reference = make_reference(policy, ReferenceSpec(mode="soft", alpha=0.6))
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6, fused=True)

    def step() -> None:
        with record_function("policy forward"):
            chosen, rejected = pair_logps(policy, batch)
        with record_function("reference forward"):
            ref_chosen, ref_rejected = reference.score(lambda model: pair_logps(model, batch))
        loss = compute_loss(
            get("dpo"), chosen.sum, rejected.sum, ref_chosen.sum, ref_rejected.sum, beta=0.1
        ).mean()
        with record_function("backward"):
            loss.backward()
        with record_function("clip"):
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        with record_function("adamw"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        with record_function("soft update"):
            reference.after_optimizer_step(1)

    step()  # warm-up: Adam's state, allocator
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
