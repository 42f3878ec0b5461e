"""Where a full fine-tuning step's memory goes: resident memory after the forward, the backward
and the optimizer step, with the optimizer stepped after backward or inside it.

    .venv/bin/python bench/step_memory.py [--lean] [--threshold-kib 1024] [--inside]
        [--checkpointing]

One process per configuration (ru_maxrss is a process's peak): SmolLM2-135M-Instruct, the
policy half of a DPO step (fused AdamW, no clipping) on 4 smol-chat pairs in shared-prompt rows,
4 steps, 1 thread. `--inside` steps each parameter inside backward
(`prefalign.training.step_in_backward`); `--checkpointing` recomputes activations in backward;
`--lean` takes the lean RMSNorm / MLP forwards (`prefalign.training.lean_activations`, the
trainer's default). `--threshold-kib N` fixes glibc's mmap threshold as the trainer does
(`trainer.malloc_mmap_threshold_kib`): every buffer of N KiB or more is returned to the system
when freed, so the resident figures are close to live memory; without it (glibc's adaptive
threshold) freed buffers stay in the heap and the peak also holds what the allocator kept.
Prints one line per step (what autograd saved for backward, weights excluded; resident
memory after each phase; peak; CPU seconds; page faults) and writes nothing.
"""

from __future__ import annotations

import argparse
import random
import resource
import sys
import time
from functools import partial
from pathlib import Path

import torch


def resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pack(saved: dict[int, int], weights: set[int], t: torch.Tensor) -> torch.Tensor:
    """A saved-tensor hook that records the bytes of each storage autograd keeps (weights
    excluded)."""
    storage = t.untyped_storage()
    if storage.data_ptr() not in weights:
        saved[storage.data_ptr()] = storage.nbytes()
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inside", action="store_true", help="step inside backward")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument(
        "--threshold-kib", type=int, default=0, help="fix glibc's mmap threshold (0: adaptive)"
    )
    parser.add_argument("--lean", action="store_true", help="lean RMSNorm / MLP activations")
    parser.add_argument("--trim", action="store_true", help="malloc_trim(0) after each step")
    parser.add_argument(
        "--trim-before-backward", action="store_true", help="malloc_trim(0) before backward"
    )
    parser.add_argument(
        "--prealloc", action="store_true", help="create Adam's state before the first step"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    from prefalign.training import malloc

    malloc.set_mmap_threshold(args.threshold_kib)
    from train_throughput import SEED, make_chat_pairs

    from prefalign.data.records import PreferenceRecord
    from prefalign.data.tokenize import tokenize_preference
    from prefalign.modeling import load_model, load_tokenizer
    from prefalign.models import SMOLLM2, resolve_model_source
    from prefalign.shared_prompt import collate_shared_pairs, pair_logps
    from prefalign.training.step_in_backward import StepInBackward

    source = resolve_model_source(SMOLLM2)
    tokenizer = load_tokenizer(source)
    policy = load_model(
        source, device="cpu", gradient_checkpointing=args.checkpointing, lean_activations=args.lean
    ).train()
    rows = make_chat_pairs(random.Random(SEED + 1), 4, tokenizer)
    records = [
        PreferenceRecord(r["prompt"], r["chosen"], r["rejected"], "bench", i + 1)
        for i, r in enumerate(rows)
    ]
    pairs, _ = tokenize_preference(records, tokenizer, max_length=256, max_prompt_length=255)
    batch = collate_shared_pairs(
        [p.prompt_ids for p in pairs],
        [p.chosen_ids for p in pairs],
        [p.rejected_ids for p in pairs],
        tokenizer.pad_token_id,
    )
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6, fused=True)
    if args.inside:
        StepInBackward(optimizer, lambda norm: sys.exit(f"non-finite gradient {norm}"))
    weights = {p.untyped_storage().data_ptr() for p in policy.parameters()}
    print(f"loaded: resident {resident_mb():.0f} MB", flush=True)
    for step in range(args.steps):
        start, faults = time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        saved: dict[int, int] = {}  # storage -> bytes autograd keeps for backward
        with torch.autograd.graph.saved_tensors_hooks(partial(pack, saved, weights), lambda t: t):
            chosen, rejected = pair_logps(policy, batch)
        loss = -torch.nn.functional.logsigmoid(0.1 * (chosen.sum - rejected.sum)).mean()
        after_forward = resident_mb()
        if args.trim_before_backward:
            malloc.glibc().malloc_trim(0)
        loss.backward()
        after_backward = resident_mb()
        if not args.inside:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        print(
            f"step {step}: saved for backward {sum(saved.values()) / 2**20:.0f} MB, "
            f"resident after forward {after_forward:.0f} MB, after backward "
            f"{after_backward:.0f} MB, after the step {resident_mb():.0f} MB, peak "
            f"{peak_mb():.0f} MB, {time.process_time() - start:.2f} CPU s, {faults} page faults",
            flush=True,
        )


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
