"""What each exact lever saves on one preference step: the same batch through the plain
computation, then with one lever more at a time.

    .venv/bin/python bench/levers.py [--model smollm2] [--data long] [--pairs 2] [--repeats 3]

Levers, cumulative: full-logits head on stacked [chosen; rejected] rows (the plain path) ->
response-only chunked head -> shared-prompt packed rows -> cached frozen reference (its forward
skipped). Each row times one policy forward+backward plus one reference forward (no_grad) of
DPO, median of `--repeats` after a warm-up, wall-clock and CPU seconds, in one process on the
same weights and pairs. `--data long`: 256-token prompts, 64-token responses; `chat`: chat-template
review requests (~47 tokens) with ~35-token responses (train_throughput's smol-chat); `short`:
toy review pairs. Writes bench/results/levers.json.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from results_json import run_header, write_results

RESULTS = Path(__file__).parent / "results" / "levers.json"
LEVERS = ("plain", "response-only head", "+ shared prompt", "+ cached reference")


def batches(tokenizer, data: str, n: int) -> tuple[dict, dict]:
    from train_throughput import make_chat_pairs, make_long_pairs, make_pairs

    from prefalign.data.records import PreferenceRecord
    from prefalign.data.tokenize import tokenize_preference
    from prefalign.logprobs import collate_prompt_response
    from prefalign.shared_prompt import collate_shared_pairs

    rng = random.Random(1)
    if data == "long":
        rows = make_long_pairs(rng, n, tokenizer, 256, 64)
    elif data == "chat":
        rows = make_chat_pairs(rng, n, tokenizer)
    else:
        rows = make_pairs(rng, n, long=False)
    records = [
        PreferenceRecord(r["prompt"], r["chosen"], r["rejected"], "bench", i + 1)
        for i, r in enumerate(rows)
    ]
    pairs, _ = tokenize_preference(records, tokenizer, max_length=512, max_prompt_length=400)
    prompts = [p.prompt_ids for p in pairs]
    stacked = collate_prompt_response(
        prompts + prompts,
        [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs],
        tokenizer.pad_token_id,
    )
    packed = collate_shared_pairs(
        prompts,
        [p.chosen_ids for p in pairs],
        [p.rejected_ids for p in pairs],
        tokenizer.pad_token_id,
    )
    return stacked, packed


def step(policy, reference, batch, lever: str, cached) -> None:
    import prefalign.logprobs as logprobs
    from prefalign.objectives import compute_loss, get
    from prefalign.shared_prompt import pair_logps

    full_head = lever == "plain"
    original = logprobs.causal_lm_parts
    if full_head:
        logprobs.causal_lm_parts = lambda model: None
    try:
        policy.zero_grad(set_to_none=True)
        chosen, rejected = pair_logps(policy, batch)
        if cached is not None:
            ref_c, ref_r = cached
        else:
            with torch.no_grad():
                ref_c, ref_r = pair_logps(reference, batch)
        loss = compute_loss(
            get("dpo"), chosen.sum, rejected.sum, ref_c.sum, ref_r.sum, beta=0.1
        ).mean()
        loss.backward()
    finally:
        logprobs.causal_lm_parts = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--data", choices=("long", "chat", "short"), default="long")
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import copy

    from prefalign.modeling import load_model, load_tokenizer
    from prefalign.models import resolve_model_source
    from prefalign.shared_prompt import pair_logps

    source = resolve_model_source(args.model)  # a GGUF source (smollm2) is imported once, cached
    tokenizer, policy = load_tokenizer(source), load_model(source, device="cpu")
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    stacked, packed = batches(tokenizer, args.data, args.pairs)
    with torch.no_grad():
        cached = pair_logps(reference, packed)
    rows = {}
    for lever in LEVERS:
        batch = stacked if lever in LEVERS[:2] else packed
        ref = cached if lever == LEVERS[3] else None
        step(policy, reference, batch, lever, ref)  # warm-up
        wall, cpu = [], []
        for _ in range(args.repeats):
            t, c = time.perf_counter(), time.process_time()
            step(policy, reference, batch, lever, ref)
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        rows[lever] = {
            "seconds": statistics.median(wall),
            "cpu_seconds": statistics.median(cpu),
            "positions": int(batch["input_ids"].numel()),
        }
        print(
            f"{lever:<22}{rows[lever]['seconds']:>8.2f} s{rows[lever]['cpu_seconds']:>8.2f} cpu-s  "
            f"{rows[lever]['positions']} positions",
            flush=True,
        )
    base = rows["plain"]["cpu_seconds"]
    for r in rows.values():
        r["speedup_cpu"] = base / r["cpu_seconds"]
    result = {
        **run_header(__file__, args.threads),
        "model": args.model,
        "data": args.data,
        "pairs": args.pairs,
        "rows": rows,
    }
    write_results(args.out, result)
    print(" ".join(f"{k}: {v['speedup_cpu']:.2f}x" for k, v in rows.items()))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
