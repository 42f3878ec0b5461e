"""Benchmark: ReST's Grow step, batched against one prompt at a time, and the cost split of one
ReST iteration (Grow sampling, scoring, Improve, evaluation) on the toy world's policy.

Both Grow variants run in the same process on the same model and the same prompts, interleaved
(batched, one-at-a-time, batched, ...) so load from other processes hits both alike; the figure to
quote is their ratio. The iteration is one Grow + one Improve step of `prefalign rest`, timed by
the recipe's own step records, plus scoring the same samples with a reward model the size of the
policy (`reward.kind=model`) for comparison with the programmatic gold reward.

    .venv/bin/python bench/rest_grow.py [--task sentiment] [--prompts 64] [--samples 4] \\
        [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from results_json import run_header, write_results

from prefalign.config import load_config
from prefalign.generation import SamplingParams, generate
from prefalign.modeling import load_model, load_tokenizer
from prefalign.rest.loop import RestConfig, run_rest
from prefalign.reward_models import RewardModel, build_reward_model
from prefalign.toy.world import ToyWorld, get_world

RESULTS = Path(__file__).parent / "results" / "rest_grow.json"


def grow_rate(
    model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int
) -> tuple[float, float]:
    """(seconds, generated tokens) to sample one response per listed prompt."""
    params = SamplingParams(
        max_new_tokens=max_new_tokens, temperature=1.0, seed=0, batch_size=batch_size
    )
    start = time.perf_counter()
    out = generate(model, tokenizer, prompts, params)
    return time.perf_counter() - start, sum(len(g.response_ids) for g in out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="sentiment", choices=["sentiment", "arith"])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt")
    parser.add_argument(
        "--single", type=int, default=32, help="samples decoded one at a time (the slow path)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument(
        "--world",
        type=Path,
        help="a built toy-world directory (default: the cached world of --task)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    world = ToyWorld(args.task, args.world) if args.world else get_world(args.task)
    max_new = world.info()["config"]["max_new_tokens"]
    tokenizer = load_tokenizer(world.policy_path)
    model = load_model(world.policy_path, device="cpu").eval()
    prompts = world.prompts("train")[: args.prompts]
    expanded = [p for p in prompts for _ in range(args.samples)]

    # ---- Grow: batched vs one prompt at a time, same model and prompts ----------------------
    runs: dict[str, list[float]] = {"batched": [], "one_at_a_time": []}
    tokens: dict[str, int] = {}
    for _ in range(args.repeats):
        seconds, n_tok = grow_rate(
            model, tokenizer, expanded, batch_size=len(expanded), max_new_tokens=max_new
        )
        runs["batched"].append(len(expanded) / seconds)
        tokens["batched"] = n_tok
        seconds, n_tok = grow_rate(
            model, tokenizer, expanded[: args.single], batch_size=1, max_new_tokens=max_new
        )
        runs["one_at_a_time"].append(args.single / seconds)
        tokens["one_at_a_time"] = n_tok
    rate = {k: statistics.median(v) for k, v in runs.items()}

    # ---- One ReST iteration: Grow, scoring, Improve, evaluation -----------------------------
    out_dir = Path(tempfile.mkdtemp(prefix="rest-bench-"))
    config = load_config(
        RestConfig,
        None,
        [
            f"model.name_or_path={world.policy_path}",
            "model.device=cpu",
            f"out_dir={out_dir / 'run'}",
            "grow_steps=1",
            "reward.kind=gold",
            f"reward.task={args.task}",
            f"grow.prompts={world.file('prompts_train.jsonl')}",
            f"grow.n_prompts={args.prompts}",
            f"grow.samples_per_prompt={args.samples}",
            f"grow.max_new_tokens={max_new}",
            f"grow.batch_size={len(expanded)}",
            "improve.steps_per_grow=1",
            "improve.normalize=per_prompt_percentile",
            "improve.thresholds=[0.4]",
            "improve.trainer.batch_size=16",
            "improve.trainer.epochs=1",
            "improve.trainer.lr=5e-4",
            "improve.trainer.progress=false",
            f"eval.task={args.task}",
            f"eval.prompts={world.file('prompts_eval.jsonl')}",
            "eval.n_prompts=32",
            "eval.samples_per_prompt=2",
        ],
    )
    records = run_rest(config, log=lambda *_: None).records
    grow_rec, improve_rec = records[1], records[2]
    samples = [
        json.loads(line) for line in (out_dir / "run" / grow_rec["file"]).read_text().splitlines()
    ]
    rm = RewardModel(
        build_reward_model(world.policy_path, tokenizer.pad_token_id), tokenizer, batch_size=64
    )
    start = time.perf_counter()
    rm.score([s["prompt"] for s in samples], [s["response"] for s in samples])
    rm_seconds = time.perf_counter() - start
    shutil.rmtree(out_dir, ignore_errors=True)
    split = {
        "grow_sampling": grow_rec["seconds_sample"],
        "scoring_gold": grow_rec["seconds_score"],
        "improve_train": improve_rec["seconds_train"],
        "evaluation": improve_rec["seconds_eval"],
    }
    total = sum(split.values())

    result = {
        "task": args.task,
        "device": "cpu",
        **run_header(__file__, torch.get_num_threads()),
        "cpu": platform.processor() or platform.machine(),
        "model_params": sum(p.numel() for p in model.parameters()),
        "max_new_tokens": max_new,
        "grow": {
            "samples_batched": len(expanded),
            "samples_one_at_a_time": args.single,
            "repeats": args.repeats,
            "samples_per_s": rate,
            "runs_samples_per_s": runs,
            "tokens_per_sample": {
                k: tokens[k] / (len(expanded) if k == "batched" else args.single) for k in tokens
            },
            "batched_over_one_at_a_time": rate["batched"] / rate["one_at_a_time"],
        },
        "iteration": {
            "prompts": args.prompts,
            "samples_per_prompt": args.samples,
            "kept": improve_rec["kept"],
            "train_steps": improve_rec["train_steps"],
            "seconds": split,
            "fraction": {k: v / total for k, v in split.items()},
            "scoring_reward_model_seconds": rm_seconds,
        },
    }
    print(
        f"toy {args.task} policy, {result['model_params'] / 1e6:.2f}M params, "
        f"{result['threads']} threads, load {result['load_avg_1m']:.1f}"
    )
    print(f"{'Grow':<28}{'samples/s':>12}")
    for name, r in rate.items():
        print(f"{name:<28}{r:>12.1f}")
    print(f"batched / one at a time: {result['grow']['batched_over_one_at_a_time']:.1f}x")
    print(
        f"\none ReST iteration ({len(expanded)} samples, {improve_rec['kept']} kept, "
        f"{improve_rec['train_steps']} optimizer steps)"
    )
    print(f"{'phase':<28}{'seconds':>10}{'share':>8}")
    for name, s in split.items():
        print(f"{name:<28}{s:>10.2f}{s / total:>8.0%}")
    print(f"{'(scoring with a reward model)':<28}{rm_seconds:>10.2f}")
    write_results(args.out, result)


if __name__ == "__main__":
    main()
