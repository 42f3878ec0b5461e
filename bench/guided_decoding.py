"""Benchmark: guided decoding throughput, side by side on the same prompts and lengths.

Rows: the base alone, the ARM alone (its cost relative to the base), GenARM batched, GenARM one
prompt at a time (how GenARM's reference evaluation scripts decode), ARGS with k candidates, and
best-of-N (N samples + reward-model scoring). Every row decodes exactly `--new-tokens` tokens
per prompt (EOS does not stop rows), so tokens/s compare like for like. Runs are interleaved
(a, b, c, a, b, c, ...) and the median is kept, so load from other processes hits every row alike.

Targets (issue 5): GenARM batched costs at most (1 + ARM cost / base cost) x 1.15 of the base
alone per token, and runs at least 5x faster than one prompt at a time at batch 32.

    .venv/bin/python bench/guided_decoding.py [--batch 32] [--new-tokens 32] [--repeats 3] \\
        [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from prefalign.genarm.baselines import args_generate, best_of_n
from prefalign.genarm.decoding import guided_generate
from prefalign.generation import SamplingParams, generate
from prefalign.reward_models import SequenceRewardModel
from prefalign.toy.corpus import review
from prefalign.toy.tokenizer import train_tokenizer

RESULTS = Path(__file__).parent / "results" / "guided_decoding.json"


def llama_config(tokenizer, hidden: int, layers: int, **extra) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 32),
        num_key_value_heads=max(1, hidden // 32),
        max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        **extra,
    )


def build(args: argparse.Namespace):
    """A toy tokenizer, base, ARM and reward model (random weights: speed does not depend on
    them)."""
    rng = random.Random(0)
    tokenizer = train_tokenizer(["".join(review(rng)) for _ in range(3000)], vocab_size=1024)
    torch.manual_seed(0)
    base = LlamaForCausalLM(llama_config(tokenizer, args.base_hidden, args.base_layers)).eval()
    arm = LlamaForCausalLM(llama_config(tokenizer, args.arm_hidden, args.arm_layers)).eval()
    rm = SequenceRewardModel(
        LlamaForSequenceClassification(
            llama_config(tokenizer, args.arm_hidden, args.arm_layers, num_labels=1)
        )
    ).eval()
    prompts = [review(rng)[0] for _ in range(args.batch)]
    return tokenizer, base, arm, rm, prompts


def time_rows(rows: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(repeats):
        for name, fn in rows.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32, help="prompts per run (one batch)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--base-hidden", type=int, default=128)
    parser.add_argument("--base-layers", type=int, default=4)
    parser.add_argument("--arm-hidden", type=int, default=128)
    parser.add_argument("--arm-layers", type=int, default=4)
    parser.add_argument("--args-k", type=int, default=10)
    parser.add_argument("--bon-n", type=int, default=4)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer, base, arm, rm, prompts = build(args)

    def params(batch_size: int) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=args.new_tokens,
            temperature=1.0,
            seed=0,
            batch_size=batch_size,
            stop_at_eos=False,
        )

    batched, single = params(args.batch), params(1)
    rows = {
        "base alone": lambda: generate(base, tokenizer, prompts, batched),
        "ARM alone": lambda: generate(arm, tokenizer, prompts, batched),
        "GenARM batched": lambda: guided_generate(base, [(arm, 1.0)], tokenizer, prompts, batched),
        "GenARM one prompt at a time": lambda: guided_generate(
            base, [(arm, 1.0)], tokenizer, prompts, single
        ),
        f"ARGS k={args.args_k}": lambda: args_generate(
            base, rm, tokenizer, prompts, batched, k=args.args_k
        ),
        f"best-of-{args.bon_n}": lambda: best_of_n(
            base, tokenizer, prompts, params(args.batch * args.bon_n), n=args.bon_n, rm=rm
        ),
    }
    for name, fn in rows.items():  # warm-up: first calls pay for allocation and kernel selection
        if name != "GenARM one prompt at a time":
            fn()
    times = time_rows(rows, args.repeats)
    tokens = args.batch * args.new_tokens
    median = {name: statistics.median(t) for name, t in times.items()}
    table = {
        name: {
            "seconds": round(s, 4),
            "tokens_per_s": round(tokens / s, 1),
            "per_token_vs_base": round(s / median["base alone"], 3),
        }
        for name, s in median.items()
    }
    arm_cost = median["ARM alone"] / median["base alone"]
    genarm_ratio = median["GenARM batched"] / median["base alone"]
    bound = (1 + arm_cost) * 1.15
    speedup = median["GenARM one prompt at a time"] / median["GenARM batched"]
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "config": vars(args),
        "parameters": {
            "base": sum(p.numel() for p in base.parameters()),
            "arm": sum(p.numel() for p in arm.parameters()),
            "reward_model": sum(p.numel() for p in rm.parameters()),
        },
        "tokens_per_run": tokens,
        "rows": table,
        "targets": {
            "arm_cost_over_base": round(arm_cost, 3),
            "genarm_batched_over_base": round(genarm_ratio, 3),
            "allowed_genarm_over_base": round(bound, 3),
            "genarm_overhead_ok": genarm_ratio <= bound,
            "batched_speedup_over_one_at_a_time": round(speedup, 2),
            "batched_speedup_ok": speedup >= 5,
        },
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "raw_seconds": {k: [round(x, 4) for x in v] for k, v in times.items()},
    }
    print(f"{'row':<30} {'seconds':>9} {'tokens/s':>10} {'x base':>8}")
    for name, row in table.items():
        print(
            f"{name:<30} {row['seconds']:>9.3f} {row['tokens_per_s']:>10.1f} "
            f"{row['per_token_vs_base']:>8.2f}"
        )
    t = result["targets"]
    print(
        f"GenARM batched / base = {t['genarm_batched_over_base']:.2f} "
        f"(allowed {t['allowed_genarm_over_base']:.2f} = "
        f"(1 + {t['arm_cost_over_base']:.2f}) x 1.15): "
        f"{'ok' if t['genarm_overhead_ok'] else 'MISSED'}"
    )
    print(
        f"GenARM batched vs one prompt at a time: "
        f"{t['batched_speedup_over_one_at_a_time']:.1f}x (target >= 5x): "
        f"{'ok' if t['batched_speedup_ok'] else 'MISSED'}"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
