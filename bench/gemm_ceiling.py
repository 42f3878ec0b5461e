"""The achievable matmul ceiling of one training step: its own GEMMs, timed alone.

    .venv/bin/python bench/gemm_ceiling.py [--model smollm2] [--shapes short49,long256] \\
        [--pairs 4,8,16] [--dtypes float32,bfloat16] [--threads 1]

One DPO training step of `--model` (SmolLM2-135M by default) on a packed shared-prompt batch is
run once in bf16 working weights (as `trainer.mixed_precision=bf16` runs it, eager attention
where the trainer picks it), and every matrix product it dispatches (`aten::mm`, `addmm`, `bmm`,
`baddbmm`: forward, both backward GEMMs of every Linear, the chunked LM head and its recompute in
backward, attention's two batched products) is recorded with its sizes and strides. Each
distinct product is then replayed alone in fp32 and in bf16 with the same layout, on one
thread, and its time multiplied by how often the step ran it. The sum is the step's matmul time
if nothing but matmuls ran, so FLOPs / that time is the ceiling a training step of this shape
can reach; it is quoted against the square-matrix peak (`bench/matmul_peak.py`, 2048x2048) of
the same dtype measured in the same process. If the ceiling is below 0.9 of the square peak,
0.9 of the square peak is out of reach for this step whatever the rest of it costs.

Shapes (as in bench/bf16_profile.py): `short49` = prompts ~49 tokens, responses ~35 (issue 13's
data), `long256` = 256-token prompts and 64-token responses; `--pairs` sets the pairs per step
(the GEMMs' M dimension grows with it). Prints one line per (shape, pairs, dtype) and a
per-kind table, and writes bench/results/gemm_ceiling.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from results_json import run_header, write_results
from torch.utils._python_dispatch import TorchDispatchMode

RESULTS = Path(__file__).parent / "results" / "gemm_ceiling.json"
GEMMS = {
    torch.ops.aten.mm.default: "mm",
    torch.ops.aten.addmm.default: "addmm",
    torch.ops.aten.bmm.default: "bmm",
    torch.ops.aten.baddbmm.default: "baddbmm",
}


class GemmRecorder(TorchDispatchMode):
    """Counts every matrix product dispatched inside it by (op, sizes, strides) and phase."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = "forward"
        self.calls: Counter[tuple] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in GEMMS:
            layout = tuple(
                (tuple(a.shape), tuple(a.stride())) if torch.is_tensor(a) else a for a in args
            )
            self.calls[(GEMMS[func], layout, self.phase)] += 1
        return func(*args, **kwargs)


def gemm_flops(op: str, layout: tuple) -> float:
    """2 m k n (times the batch) of one product; the bias add of addmm is not counted."""
    mats = [spec for spec in layout if isinstance(spec, tuple)]
    a, b = (mats[1], mats[2]) if op in ("addmm", "baddbmm") else (mats[0], mats[1])
    batch = a[0][0] if op in ("bmm", "baddbmm") else 1
    m, k = a[0][-2], a[0][-1]
    n = b[0][-1]
    return 2.0 * batch * m * k * n


def kind_of(op: str, layout: tuple, phase: str, vocab: int, weight_shapes: set) -> str:
    """What a product is for: attention, LM head (forward, recompute, gradients), a Linear's
    forward, input gradient (dgrad) or weight gradient (wgrad)."""
    if op in ("bmm", "baddbmm"):
        return "attention"
    mats = [spec[0] for spec in layout if isinstance(spec, tuple)]
    a, b = (mats[1], mats[2]) if op == "addmm" else (mats[0], mats[1])
    out = (a[0], b[1])
    head = vocab in a or vocab in b
    if phase == "forward":
        return "head forward" if head else "linear forward"
    if head:
        if out[1] == vocab:
            return "head recompute"
        return "head wgrad" if out in weight_shapes else "head dgrad"
    return "linear wgrad" if out in weight_shapes else "linear dgrad"


def record_step(model, batch) -> Counter:
    """The products of one forward + backward of the DPO loss on `batch` (a cached reference)."""
    from prefalign.objectives import compute_loss, get
    from prefalign.shared_prompt import pair_logps

    with torch.no_grad():
        c, r = pair_logps(model, batch)
    recorder = GemmRecorder()
    with recorder:
        chosen, rejected = pair_logps(model, batch)
        loss = compute_loss(
            get("dpo"), chosen.sum, rejected.sum, c.sum + 0.5, r.sum - 0.5, beta=0.1
        ).mean()
        recorder.phase = "backward"
        loss.backward()
    model.zero_grad(set_to_none=True)
    return recorder.calls


def materialize(layout: tuple, dtype: torch.dtype) -> list:
    return [
        torch.empty_strided(spec[0], spec[1], dtype=dtype).normal_()
        if isinstance(spec, tuple)
        else spec
        for spec in layout
    ]


def time_gemm(op: str, layout: tuple, dtype: torch.dtype, min_seconds: float) -> float:
    """Median CPU seconds of one call (one thread: CPU time is the time it got on its core)."""
    func = next(f for f, name in GEMMS.items() if name == op)
    args = materialize(layout, dtype)
    func(*args)  # warm-up: oneDNN/AMX primitive creation
    times: list[float] = []
    spent = 0.0
    while len(times) < 3 or (spent < min_seconds and len(times) < 200):
        start = time.process_time()
        func(*args)
        times.append(time.process_time() - start)
        spent += times[-1]
    return statistics.median(times)


def ceiling(calls: Counter, vocab: int, weight_shapes: set, dtype, min_seconds: float) -> dict:
    kinds: dict[str, dict[str, float]] = {}
    for (op, layout, phase), count in calls.items():
        kind = kind_of(op, layout, phase, vocab, weight_shapes)
        seconds = time_gemm(op, layout, dtype, min_seconds) * count
        row = kinds.setdefault(kind, {"calls": 0, "flops": 0.0, "seconds": 0.0})
        row["calls"] += count
        row["flops"] += gemm_flops(op, layout) * count
        row["seconds"] += seconds
    total_flops = sum(k["flops"] for k in kinds.values())
    total_seconds = sum(k["seconds"] for k in kinds.values())
    return {
        "flops": total_flops,
        "seconds": total_seconds,
        "flops_per_s": total_flops / total_seconds,
        "kinds": kinds,
    }


def prepare(model_source: str, shape: str, pairs: int):
    from bf16_profile import SHAPES, make_batch

    from prefalign.modeling import load_model, load_tokenizer
    from prefalign.models import resolve_model_source
    from prefalign.training.bf16_weights import Bf16MasterWeights
    from prefalign.training.cpu_attention import use_eager_attention_for_bf16

    source = resolve_model_source(model_source)
    tokenizer = load_tokenizer(source)
    model = load_model(source, device="cpu")
    batch = make_batch(tokenizer, {**SHAPES[shape], "pairs": pairs})
    rows, width = batch["input_ids"].shape
    eager = use_eager_attention_for_bf16(model, rows, width)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    Bf16MasterWeights(model)
    model.train()
    return model, batch, eager


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--shapes", default="short49,long256")
    parser.add_argument("--pairs", default="4,8,16", help="comma-separated pairs per step")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--min-seconds", type=float, default=0.05, help="CPU seconds each product is timed for"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from matmul_peak import matmul_flops

    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    peaks = {
        str(d): matmul_flops(2048, repeats=7, threads=args.threads, dtype=d)[
            "median_flops_per_cpu_s"
        ]
        for d in dtypes
    }
    runs = []
    for shape in args.shapes.split(","):
        for pairs in (int(p) for p in args.pairs.split(",")):
            model, batch, eager = prepare(args.model, shape, pairs)
            calls = record_step(model, batch)
            vocab = model.config.vocab_size
            weight_shapes = {
                tuple(m.weight.shape)
                for m in model.modules()
                if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))
            }
            weight_shapes |= {s[::-1] for s in weight_shapes}
            positions = int(batch["input_ids"].numel())
            for dtype in dtypes:
                result = ceiling(calls, vocab, weight_shapes, dtype, args.min_seconds)
                peak = peaks[str(dtype)]
                run = {
                    "shape": shape,
                    "pairs": pairs,
                    "rows_x_width": list(batch["input_ids"].shape),
                    "positions": positions,
                    "eager_attention": eager,
                    "dtype": str(dtype).removeprefix("torch."),
                    "square_peak_flops_per_cpu_s": peak,
                    "ceiling_flops_per_cpu_s": result["flops_per_s"],
                    "ceiling_share_of_peak": result["flops_per_s"] / peak,
                    "gemm_cpu_s": result["seconds"],
                    "gemm_flops": result["flops"],
                    "kinds": result["kinds"],
                }
                runs.append(run)
                kinds = "  ".join(
                    f"{k} {v['flops'] / v['seconds'] / peak:.2f}"
                    for k, v in sorted(result["kinds"].items(), key=lambda kv: -kv[1]["flops"])
                )
                print(
                    f"{shape:<8} {pairs:>2} pairs {run['dtype']:<8} ({positions} positions): "
                    f"{result['flops'] / 1e9:7.1f} GFLOP in {result['seconds']:6.3f} cpu-s = "
                    f"{result['flops_per_s'] / 1e9:7.1f} GFLOP/s, "
                    f"{run['ceiling_share_of_peak']:.2f} of the square peak "
                    f"({peak / 1e9:.0f})  |  by kind: {kinds}",
                    flush=True,
                )
            del model
    result = {
        **run_header(__file__, args.threads),
        "square_peaks_flops_per_cpu_s": peaks,
        "runs": runs,
    }
    write_results(args.out, result)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
