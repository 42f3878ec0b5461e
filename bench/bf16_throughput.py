"""bf16 training throughput on SmolLM2-135M: prefalign's bf16 paths against TRL bf16, one run.

    .venv/bin/python bench/bf16_throughput.py [--sizes issue,long] [--threads 1] [--repeats 1] \\
        [--variants frozen+bf16,frozen+bf16+autocast,soft+bf16,frozen+bf16+lora,...]

The runs, timing, token counting and table are `train_throughput.py`'s (every run in a fresh
process, the warm-up steps excluded, pairs per wall-clock and per CPU second, peak RSS,
effective FLOP/s = 8 N per real token of the unshared pair over the same dtype's matmul peak);
this script only adds the data shapes of issue 13's bf16 rows:

- issue: prompts of ~49 tokens and responses of ~35 (the issue's SmolLM2 table), 4 pairs a step;
- long: 256-token prompts and 64-token responses, 2 pairs a step.

`bf16` is prefalign's default bf16 (bf16 weights with fp32 masters) and TRL's `bf16=True`;
`+autocast` is prefalign with `trainer.bf16_path=autocast` (no TRL side). Writes
bench/results/bf16_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "bf16_throughput.json"
SHAPES = {
    "issue": dict(prompt=49, response=35, batch=4, max_length=256, warmup=1, steps=3),
    "long": dict(prompt=256, response=64, batch=2, max_length=512, warmup=1, steps=2),
}
DEFAULT_VARIANTS = (
    "frozen+bf16,frozen+bf16+autocast,soft+bf16,soft+bf16+autocast,"
    "frozen+bf16+lora,frozen+bf16+lora+autocast"
)


def workspace(root: Path, name: str, steps: int | None) -> dict:
    """SmolLM2-135M and one epoch of pairs of the shape `name`."""
    from train_throughput import SEED, make_long_pairs, smollm2_workspace

    from prefalign.modeling import load_tokenizer

    shape = {**SHAPES[name], **({"steps": steps} if steps else {})}
    spec = smollm2_workspace(root / name, dict(model="smollm2", data="short", **shape))
    n_pairs = shape["batch"] * (shape["warmup"] + shape["steps"])
    rows = make_long_pairs(
        random.Random(SEED + 1),
        n_pairs,
        load_tokenizer(spec["model_dir"]),
        prompt_tokens=shape["prompt"],
        response_tokens=shape["response"],
    )
    Path(spec["pairs"]).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {**spec, "long": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="issue,long", help=f"comma-separated: {list(SHAPES)}")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default per size)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import torch
    from matmul_peak import matmul_flops
    from train_throughput import FRAMEWORKS, print_table, run_variant, summarize, trl_runs

    torch.set_num_threads(args.threads)
    sizes = args.sizes.split(",")
    variants = args.variants.split(",")
    workdir = Path(tempfile.mkdtemp(prefix="bf16-throughput-"))
    start = time.perf_counter()
    spaces = {size: workspace(workdir, size, args.steps) for size in sizes}
    peak_runs: dict[str, list[dict]] = {"fp32": [], "bf16": []}

    def measure_peak() -> None:
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            peak_runs[name].append(matmul_flops(2048, repeats=7, threads=args.threads, dtype=dtype))

    measure_peak()
    runs, loads = [], [os.getloadavg()[0]]
    for size in sizes:
        for rep in range(args.repeats):
            frameworks = FRAMEWORKS if rep % 2 == 0 else tuple(reversed(FRAMEWORKS))
            for variant in variants:
                for framework in frameworks:
                    if framework == "trl" and not trl_runs(variant):
                        continue
                    r = run_variant(workdir, spaces[size], size, variant, framework, args.threads)
                    runs.append(r)
                    print(
                        f"{size:<7}{variant:<24}{framework:<10}{r['pairs_per_s']:>7.2f} pairs/s "
                        f"{r['pairs_per_cpu_s']:>7.2f} pairs/cpu-s  peak RSS "
                        f"{r['peak_rss_mb']:.0f} MB",
                        flush=True,
                    )
            loads.append(os.getloadavg()[0])
        measure_peak()
    peaks = {
        d: {
            "wall": statistics.median(p["median_flops"] for p in ps),
            "cpu": statistics.median(p["median_flops_per_cpu_s"] for p in ps),
        }
        for d, ps in peak_runs.items()
    }
    rows = summarize(runs, spaces, variants, peaks)
    print_table(rows, spaces, peaks, args.threads)
    print("load average (1 min) before and after each size:", [round(x, 1) for x in loads])
    result = {
        "command": "python bench/bf16_throughput.py " + " ".join(sys.argv[1:]),
        "threads": args.threads,
        "load_avg_1m": loads,
        "matmul_peaks": peaks,
        "results": rows,
        "runs": runs,
        "wall_s": time.perf_counter() - start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} ({result['wall_s']:.0f}s)")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
