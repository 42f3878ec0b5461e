"""Where one soft trust-region DPO step's CPU time goes, and what bounds its FLOP/s share.

    .venv/bin/python bench/profile_step.py [--pairs 4] [--repeats 3] [--data chat|short|long]
        [--out bench/results/x.json]

SmolLM2-135M-Instruct, smol-chat pairs (train_throughput's chat shape; `--data short`: its
smol-short review pairs of ~3-token prompts, `long`: 256-token prompts) in shared-prompt rows,
1 thread: the policy forward, the reference forward (no autograd), backward, clipping, fused
AdamW and the soft update (alpha 0.6), each under its own `record_function` label, after one
warm-up step, with the trainer's clipping (`training.clip_step`) and mmap threshold. Prints
the operators by self CPU time (which SDPA kernel runs shows here), then per phase its CPU
time, the time and FLOPs of its matmuls (`aten::mm`/`addmm`/`bmm`, 2MKN each, from the
recorded shapes), and its page faults and system time (the faults' cost: a matmul writing a
fresh buffer pays them inside its own CPU time), for `--repeats` profiled steps (medians).

The step's effective FLOP/s (8 P per real token of the unshared pair, as train_throughput.py
counts it) is quoted over the fp32 matmul peak (2048x2048) measured around the steps in the same
process, for the soft step and for its frozen-reference phases (a cached frozen reference skips
the reference forward and the soft update). What the step's own GEMM shapes reach alone is
bench/gemm_ceiling.py's figure; `--out` writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import statistics
import sys
from collections import Counter, defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

PHASES = ("policy forward", "reference forward", "backward", "clip", "adamw", "soft update")
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")


def matmul_flops_of(name: str, shapes: list) -> float:
    """2 M K N (times the batch) of one recorded matmul call."""
    a, b = (shapes[1], shapes[2]) if name == "aten::addmm" else (shapes[0], shapes[1])
    batch = a[0] if name == "aten::bmm" else 1
    return 2.0 * batch * a[-2] * a[-1] * b[-1]


def phase_table(events) -> dict[str, dict[str, float]]:
    """Self CPU seconds of every operator, and of the matmuls, summed per labelled phase."""
    spans = [(e.time_range.start, e.time_range.end, e.name) for e in events if e.name in PHASES]
    out: dict[str, dict[str, float]] = defaultdict(Counter)
    for e in events:
        if e.name in PHASES:
            continue
        phase = next((n for s, t, n in spans if s <= e.time_range.start <= t), "loss and rest")
        out[phase]["cpu_s"] += e.self_cpu_time_total / 1e6
        if e.name in MATMULS and e.input_shapes:
            out[phase]["matmul_s"] += e.self_cpu_time_total / 1e6
            out[phase]["matmul_flop"] += matmul_flops_of(e.name, e.input_shapes)
    return {k: dict(v) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="profiled steps (medians)")
    parser.add_argument("--data", choices=("chat", "short", "long"), default="chat")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from levers import batches

    from prefalign.training import clip_step, malloc
    from prefalign.training.loop import TrainerConfig

    malloc.set_mmap_threshold(TrainerConfig.malloc_mmap_threshold_kib)  # as the trainer runs
    from matmul_peak import matmul_flops

    from prefalign.modeling import load_model, load_tokenizer
    from prefalign.models import SMOLLM2, resolve_model_source
    from prefalign.objectives import compute_loss, get
    from prefalign.reference import ReferenceSpec, make_reference
    from prefalign.shared_prompt import pair_logps

    random.seed(0)
    source = resolve_model_source(SMOLLM2)
    tokenizer, policy = load_tokenizer(source), load_model(source, device="cpu").train()
    _, batch = batches(tokenizer, args.data, args.pairs)
    reference = make_reference(policy, ReferenceSpec(mode="soft", alpha=0.6))
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6, fused=True)
    # What train_throughput credits: 8 P per real token of the unshared pair (prompt twice).
    lp, lc, lr = batch["segments"].sum(dim=0).tolist()
    unshared_tokens = 2 * lp + lc + lr
    n_params = sum(p.numel() for p in policy.parameters())  # tied embeddings: all in matmuls
    credited_flop = 8.0 * n_params * unshared_tokens

    paging: dict[str, dict[str, float]] = {}  # per phase of the last step: faults, system s

    @contextlib.contextmanager
    def phase(name: str):
        """A labelled phase; its page faults and system time (mostly the faults) recorded."""
        before = resource.getrusage(resource.RUSAGE_SELF)
        with record_function(name):
            yield
        after = resource.getrusage(resource.RUSAGE_SELF)
        paging[name] = {
            "page_faults": after.ru_minflt - before.ru_minflt,
            "system_s": after.ru_stime - before.ru_stime,
        }

    def step() -> None:
        with phase("policy forward"):
            chosen, rejected = pair_logps(policy, batch)
        with phase("reference forward"):
            ref_chosen, ref_rejected = reference.score(lambda model: pair_logps(model, batch))
        loss = compute_loss(
            get("dpo"), chosen.sum, rejected.sum, ref_chosen.sum, ref_rejected.sum, beta=0.1
        ).mean()
        with phase("backward"):
            loss.backward()
        with phase("clip"):  # the trainer's: the norm here, the factor in AdamW
            norm = clip_step.grad_norm(params)
        with phase("adamw"):
            clip_step.clipped_step(optimizer, optimizer, params, norm, 1.0)
            optimizer.zero_grad(set_to_none=True)
        with phase("soft update"):
            reference.after_optimizer_step(1)

    step()  # warm-up: Adam's state, allocator
    peaks = [matmul_flops(2048, repeats=7, threads=1)["median_flops_per_cpu_s"]]
    tables = []
    for i in range(args.repeats):
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            step()
        if i == 0:
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        tables.append(phase_table(prof.events()))
        for name, counts in paging.items():
            tables[-1].setdefault(name, {}).update(counts)
        peaks.append(matmul_flops(2048, repeats=7, threads=1)["median_flops_per_cpu_s"])
    peak = statistics.median(peaks)
    phases = {
        name: {
            key: statistics.median(t.get(name, {}).get(key, 0.0) for t in tables)
            for key in ("cpu_s", "matmul_s", "matmul_flop", "page_faults", "system_s")
        }
        for name in (*PHASES, "loss and rest")
    }
    step_s = sum(p["cpu_s"] for p in phases.values())
    frozen = {k: v for k, v in phases.items() if k not in ("reference forward", "soft update")}
    frozen_s = sum(p["cpu_s"] for p in frozen.values())
    matmul_s = sum(p["matmul_s"] for p in phases.values())
    print(
        f"\n{'phase':<20}{'CPU s':>8}{'share':>7}{'matmul s':>10}{'GFLOP':>8}{'GFLOP/s':>9}"
        f"{'faults':>9}{'sys s':>7}"
    )
    for name, p in phases.items():
        rate = p["matmul_flop"] / p["matmul_s"] / 1e9 if p["matmul_s"] else 0.0
        print(
            f"{name:<20}{p['cpu_s']:>8.3f}{p['cpu_s'] / step_s:>7.1%}{p['matmul_s']:>10.3f}"
            f"{p['matmul_flop'] / 1e9:>8.1f}{rate:>9.1f}{p['page_faults']:>9.0f}"
            f"{p['system_s']:>7.3f}"
        )
    matmul_flop = sum(p["matmul_flop"] for p in phases.values())
    summary = {
        "command": "python bench/profile_step.py " + " ".join(sys.argv[1:]),
        "load_avg_1m": os.getloadavg()[0],  # other jobs' load slows the matmuls most
        "pairs": args.pairs,
        "data": args.data,
        "unshared_real_tokens": unshared_tokens,
        "computed_positions": int(batch["input_ids"].numel()),
        "n_params": n_params,
        "fp32_peak_flops_per_cpu_s": peak,
        "fp32_peak_runs": peaks,
        "step_cpu_s": step_s,
        "frozen_step_cpu_s": frozen_s,
        "credited_flop": credited_flop,
        "matmul_flop": matmul_flop,
        # soft share of peak = credited / matmul FLOP x matmul rate / peak x matmul time share
        "credited_over_matmul_flop": credited_flop / matmul_flop,
        "matmul_rate_over_peak": matmul_flop / matmul_s / peak,
        "matmul_share": matmul_s / step_s,
        "soft_fraction_of_peak": credited_flop / step_s / peak,
        "frozen_fraction_of_peak": credited_flop / frozen_s / peak,
        "phases": phases,
    }
    print(
        f"\nfp32 matmul peak (2048^2, median of {len(peaks)} runs around the steps): "
        f"{peak / 1e9:.1f} GFLOP/s per CPU-s\n"
        f"soft step {step_s:.2f} CPU-s (its frozen phases {frozen_s:.2f}); share of peak "
        f"{summary['soft_fraction_of_peak']:.2f} (frozen {summary['frozen_fraction_of_peak']:.2f})"
        f" = credited 8 P x {unshared_tokens} tokens over the matmul FLOPs done "
        f"{summary['credited_over_matmul_flop']:.2f} x matmul rate over peak "
        f"{summary['matmul_rate_over_peak']:.2f} x matmul share of the step "
        f"{summary['matmul_share']:.2f}"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
