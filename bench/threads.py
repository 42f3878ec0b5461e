"""Torch threads on a toy-size run: `prefalign train` of the toy demo's dpo row, 1 vs 2 threads.

Each run is a fresh `prefalign train` process with `trainer.threads=N` (24 steps of 16 pairs,
the quick demo's dpo row on the cached toy sentiment world); runs alternate between the thread
counts so that load from other processes hits both alike, and each run records its training
seconds (the trainer's own clock), its wall time and its CPU seconds (user + system of the
child). The load average is printed before and after: spin-waiting threads cost most when the
cores are contended.

    python bench/threads.py [--repeats 3] [--threads 1,2] [--out bench/results/threads.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_json import write_results

RESULTS = Path(__file__).parent / "results" / "threads.json"


def dpo_row_overrides(out_dir: Path, threads: int) -> list[str]:
    """The quick demo's dpo row (prefalign.demo.preference) as `prefalign train` overrides."""
    from prefalign.toy.world import get_world

    world = get_world("sentiment")
    return [
        f"model.name_or_path={world.policy_path}",
        f"data.path={world.file('pairs.jsonl')}",
        "data.max_length=64",
        "data.max_prompt_length=16",
        "objective.name=dpo",
        "objective.params={beta: 0.1}",
        f"trainer.out_dir={out_dir}",
        "trainer.batch_size=16",
        "trainer.max_steps=24",
        "trainer.lr=5e-4",
        "trainer.warmup_ratio=0.1",
        "trainer.log_every=8",
        "trainer.progress=false",
        f"trainer.threads={threads}",
    ]


def run_once(threads: int, scratch: Path, index: int) -> dict:
    out_dir = scratch / f"run-{index}-t{threads}"
    cmd = [sys.executable, "-m", "prefalign.cli", "train", *dpo_row_overrides(out_dir, threads)]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # the option decides
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    text = done.stdout  # the JSON summary, then a line naming the report
    summary = json.loads(text[text.index("{\n") : text.rindex("}") + 1])
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"threads": threads, "train_s": summary["seconds"], "wall_s": round(wall, 2),
            "cpu_s": round(cpu, 2), "load_1m": os.getloadavg()[0]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    counts = [int(t) for t in args.threads.split(",")]
    load_before = os.getloadavg()
    runs = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_suffix(".partial.jsonl")  # every run as it ends: a timeout keeps them
    partial.write_text("")
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for threads in counts:
                runs.append(run_once(threads, Path(tmp), r))
                print(json.dumps(runs[-1]), flush=True)
                with partial.open("a") as f:
                    f.write(json.dumps(runs[-1]) + "\n")
    medians = {}
    for threads in counts:
        mine = sorted(run["train_s"] for run in runs if run["threads"] == threads)
        medians[threads] = mine[len(mine) // 2]
    result = {"cpus": os.cpu_count(), "load_before": load_before, "load_after": os.getloadavg(),
              "runs": runs, "median_train_s": medians}  # fmt: skip
    for threads in counts:
        ratio = medians[threads] / medians[counts[0]]
        print(f"{threads} threads: median training {medians[threads]:.1f} s ({ratio:.2f}x)")
    print(f"load average before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f}")
    write_results(args.out, result)
    partial.unlink()


if __name__ == "__main__":
    main()
