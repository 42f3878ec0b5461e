"""The machine's measured matmul throughput: the ceiling training FLOP/s is quoted against.

    .venv/bin/python bench/matmul_peak.py [--size 2048] [--repeats 10] [--threads 2] \\
        [--dtype bfloat16]

Times `torch.matmul` of two square fp32 (or bf16) matrices (2 * n^3 FLOPs each) and reports the
median, so a burst of load from other processes on a shared machine moves it less than a mean would.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def matmul_flops(
    size: int = 2048,
    repeats: int = 10,
    threads: int = 0,
    warmup: int = 3,
    dtype: torch.dtype = torch.float32,
) -> dict[str, float]:
    """Median and best matmul FLOP/s of a size x size product of `dtype` on the CPU."""
    if threads:
        torch.set_num_threads(threads)
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    out = torch.empty(size, size, dtype=dtype)
    for _ in range(warmup):
        torch.matmul(a, b, out=out)
    seconds, cpu_seconds = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        torch.matmul(a, b, out=out)
        seconds.append(time.perf_counter() - start)
        cpu_seconds.append((time.process_time() - cpu_start) / torch.get_num_threads())
    flops = 2.0 * size**3
    return {
        "size": size,
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "median_flops": flops / statistics.median(seconds),
        "best_flops": flops / min(seconds),
        # CPU time per thread: what the matmul gets while it runs, whatever else shares the cores.
        "median_flops_per_cpu_s": flops / statistics.median(cpu_seconds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args()
    r = matmul_flops(args.size, args.repeats, args.threads, dtype=getattr(torch, args.dtype))
    print(
        f"{args.dtype} matmul {r['size']}x{r['size']}, {r['threads']} threads: "
        f"median {r['median_flops'] / 1e9:.1f} GFLOP/s, best {r['best_flops'] / 1e9:.1f} GFLOP/s, "
        f"per CPU-second {r['median_flops_per_cpu_s'] / 1e9:.1f} GFLOP/s"
    )


if __name__ == "__main__":
    main()
