"""Micro-benchmark: soft reference update (TR-DPO) of a ~20M-parameter Llama.

Compares, in the same run and on the same tensors, the fused foreach update used by
`prefalign.reference` with a naive per-parameter Python loop, plus the update the trainer runs
for a LoRA policy (r 16): the exact mixture of the weight updates B @ A into a reference adapter
of rank `reference.lora_rank` (default 4x r: batched QR and SVD per layer shape,
`prefalign.lora_mix`), beside the elementwise mix of the factors it replaced (inexact, for
scale). Prints a table and writes bench/results/reference_update.json.

    .venv/bin/python bench/reference_update.py [--repeats 30] [--device cpu] [--threads 1]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from results_json import run_header, write_results
from transformers import LlamaConfig, LlamaForCausalLM

from prefalign.modeling import LoraSpec, add_lora
from prefalign.reference import ReferenceSpec, make_reference

ALPHA = 0.6
RESULTS = Path(__file__).parent / "results" / "reference_update.json"


def build_llama(device: torch.device) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=8000,
        hidden_size=384,
        intermediate_size=1024,
        num_hidden_layers=8,
        num_attention_heads=6,
        num_key_value_heads=6,
    )
    return LlamaForCausalLM(config).to(device)


def time_ms(
    fns: dict[str, Callable[[], None]], repeats: int, device: torch.device
) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall time and median CPU time (this process, all its threads) of each function,
    in milliseconds.

    Runs are interleaved (a, b, a, b, ...) so that load from other processes on a shared machine
    hits every variant alike; CPU time is what a loaded machine does not inflate.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(repeats + 3):
        for name, fn in fns.items():
            sync()
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            sync()
            if round_ >= 3:  # the first rounds are warm-up
                times[name].append((time.perf_counter() - start) * 1e3)
                cpu[name].append((time.process_time() - start_cpu) * 1e3)
    median = statistics.median
    return {n: median(t) for n, t in times.items()}, {n: median(t) for n, t in cpu.items()}


def naive_update(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> Callable[[], None]:
    @torch.no_grad()
    def update() -> None:
        for p_ref, p in pairs:
            p_ref.mul_(1 - ALPHA).add_(p, alpha=ALPHA)

    return update


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    policy = build_llama(device)
    n_params = sum(p.numel() for p in policy.parameters())
    ref = make_reference(policy, ReferenceSpec(mode="soft", alpha=ALPHA))
    policy_tensors = dict(policy.named_parameters()) | dict(policy.named_buffers())
    pairs = [(t, policy_tensors[n]) for n, t in ref.model.named_parameters()]
    pairs += [(t, policy_tensors[n]) for n, t in ref.model.named_buffers() if t.is_floating_point()]

    lora_policy = add_lora(build_llama(device), LoraSpec(r=16))
    with torch.no_grad():  # a trained adapter: B is no longer zero, so the mixture is full rank
        for name, p in lora_policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    lora_spec = ReferenceSpec(mode="soft", alpha=ALPHA)
    lora_ref = make_reference(lora_policy, lora_spec)
    n_adapter = sum(p.numel() for n, p in lora_policy.named_parameters() if ".reference." in n)
    # The old update: each factor of a same-shape copy lerped toward the policy's.
    policy_factors = [p for n, p in lora_policy.named_parameters() if ".default." in n]
    factor_copies = [p.detach().clone() for p in policy_factors]

    rows, cpu_rows = time_ms(
        {
            "full_foreach": lambda: ref.after_optimizer_step(1),
            "full_python_loop": naive_update(pairs),
            "lora_r16_exact_mix": lambda: lora_ref.after_optimizer_step(1),
            "lora_r16_factor_lerp_old": lambda: torch._foreach_lerp_(
                factor_copies, policy_factors, ALPHA
            ),
        },
        args.repeats,
        device,
    )

    result = {
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        **run_header(__file__, torch.get_num_threads()),
        "cpu": platform.processor() or platform.machine(),
        "model_params": n_params,
        "model_tensors": len(pairs),
        "lora_reference_params": n_adapter,
        "lora_reference_rank": lora_spec.lora_rank or 4 * 16,
        "lora_truncation_error": lora_ref.update_metrics().get("reference/truncation_error"),
        "alpha": ALPHA,
        "repeats": args.repeats,
        "ms_per_update": rows,
        "cpu_ms_per_update": cpu_rows,
        "loop_over_foreach": rows["full_python_loop"] / rows["full_foreach"],
    }
    print(f"Llama {n_params / 1e6:.1f}M params, {len(pairs)} tensors, device {result['device']}")
    print(f"{'update':<26}{'ms/update':>12}{'CPU ms':>12}")
    for name, ms in rows.items():
        print(f"{name:<26}{ms:>12.3f}{cpu_rows[name]:>12.3f}")
    print(f"python loop / foreach: {result['loop_over_foreach']:.2f}x")
    print(f"LoRA reference adapter: rank {result['lora_reference_rank']}, {n_adapter} params")
    write_results(args.out, result)


if __name__ == "__main__":
    main()
