"""Where the time of one bf16 DPO training step goes: torch.profiler over a SmolLM2-135M step.

    .venv/bin/python bench/bf16_profile.py [--paths autocast,weights,fp32] [--threads 1,2] \\
        [--shapes short49,long256] [--model smollm2] [--reference cached]

One training step as `prefalign train` runs it with its defaults (shared-prompt packed rows,
response-only chunked head, a frozen reference whose log-probs are cached, so the step is the
policy's forward and backward, gradient clipping and a fused AdamW step); `--reference live`
adds a no-grad reference forward (a soft trust region's step). Paths:

- `autocast`: fp32 weights under `torch.autocast(bfloat16)` (accelerate's bf16);
- `weights`: bf16 working weights with fp32 masters (`prefalign.training.bf16_weights`),
  stepped as the trainer steps them: clipping, AdamW and the bf16 refresh in one chunked pass
  over the bf16 gradients (`prefalign.training.master_step`);
- `weights-plain`: the same weights with the plain step (fp32 master gradients, clipping,
  fused AdamW, a refresh copy): the difference is the fused step's gain;
- `fp32`: no mixed precision.

Shapes: `short49` = the issue's data (prompts ~49 tokens, responses ~35, 4 pairs a step),
`long256` = 256-token prompts and 64-token responses, 2 pairs a step. After one warm-up step,
one step is profiled; every operator's self CPU time is put in one bucket (matmul, casts,
attention forward / backward, softmax and log-sum-exp, elementwise and norms, optimizer,
other), and the buckets are printed as shares of the step. Each (path, threads, shape) runs in a
fresh process. Writes bench/results/bf16_profile.json (the top operators of every run too).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

from results_json import write_results

RESULTS = Path(__file__).parent / "results" / "bf16_profile.json"
SHAPES = {
    "short49": dict(prompt=49, response=35, pairs=4),
    "long256": dict(prompt=256, response=64, pairs=2),
}
# Operator name -> bucket, first match wins (self time, so nothing is counted twice).
BUCKETS = (
    (
        "attention backward",
        (
            "attention_for_cpu_backward",
            "_efficient_attention_backward",
            "scaled_dot_product_attention_backward",
            "attention_backward",
        ),
    ),
    ("attention forward", ("flash_attention", "scaled_dot_product", "_efficient_attention")),
    (
        "matmul",
        ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear"),
    ),
    ("casts", ("aten::to", "aten::_to_copy", "aten::copy_", "aten::_foreach_copy_")),
    ("softmax / log-sum-exp", ("softmax", "logsumexp", "log_softmax")),
    ("optimizer", ("adam", "foreach", "clip_grad", "aten::norm", "linalg_vector_norm")),
    ("embedding / gather / index", ("embedding", "gather", "index", "scatter", "nonzero")),
    (
        "elementwise / norms",
        (
            "aten::mul",
            "aten::add",
            "aten::sub",
            "aten::div",
            "aten::rsqrt",
            "aten::pow",
            "aten::mean",
            "aten::sum",
            "aten::silu",
            "aten::neg",
            "aten::cat",
            "aten::exp",
            "aten::where",
            "aten::fill_",
            "aten::zero_",
            "aten::clone",
            "aten::sigmoid",
            "aten::cos",
            "aten::sin",
            "silu_backward",
            "aten::masked_fill",
            "aten::threshold",
            "aten::gelu",
            "aten::tanh",
            "aten::cumsum",
        ),
    ),
)


def bucket_of(name: str) -> str:
    low = name.lower()
    for bucket, keys in BUCKETS:
        if any(k.lower() in low for k in keys):
            return bucket
    return "other"


def make_batch(tokenizer, shape: dict) -> dict:
    from bf16_accuracy import packed_batch
    from train_throughput import make_long_pairs

    from prefalign.data.records import PreferenceRecord

    rows = make_long_pairs(
        random.Random(1), shape["pairs"], tokenizer, shape["prompt"], shape["response"]
    )
    records = [
        PreferenceRecord(r["prompt"], r["chosen"], r["rejected"], "bench", i + 1)
        for i, r in enumerate(rows)
    ]
    return packed_batch(records, tokenizer, max_length=512, max_prompt_length=400)


def worker(job: dict) -> dict:
    import contextlib
    import copy

    import torch

    from prefalign.modeling import load_model, load_tokenizer
    from prefalign.models import resolve_model_source
    from prefalign.objectives import compute_loss, get
    from prefalign.shared_prompt import pair_logps
    from prefalign.training.bf16_weights import Bf16MasterWeights
    from prefalign.training.master_step import clip_coefficient

    torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    source = resolve_model_source(job["model"])
    tokenizer = load_tokenizer(source)
    model = load_model(source, device="cpu")
    if job["attn"] != "sdpa":
        model.set_attn_implementation(job["attn"])
    for module in model.modules():  # as prefalign's trainer.disable_dropout
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    batch = make_batch(tokenizer, SHAPES[job["shape"]])
    path = job["path"]
    with torch.no_grad():
        c, r = pair_logps(model, batch)
        cached = (c.sum + 0.5, r.sum - 0.5)
    master = Bf16MasterWeights(model) if path.startswith("weights") else None
    fused = path == "weights"  # the trainer's default: one pass over the bf16 gradients
    if master is not None:
        master.keep_bf16_grads = fused
    reference = (
        copy.deepcopy(model).eval().requires_grad_(False) if job["reference"] == "live" else None
    )
    if job.get("compile"):  # each decoder layer through torch.compile (inductor, CPU)
        for layer in model.model.layers:
            layer.compile(dynamic=False)
    params = master.masters if master else [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6, fused=True)
    model.train()

    def step() -> None:
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=path == "autocast")
        with autocast:
            chosen, rejected = pair_logps(model, batch)
            if reference is not None:
                with torch.no_grad():
                    ref_c, ref_r = pair_logps(reference, batch)
                ref = (ref_c.sum, ref_r.sum)
            else:
                ref = cached
            loss = compute_loss(get("dpo"), chosen.sum, rejected.sum, *ref, beta=0.1).mean()
        loss.backward()
        if fused:
            master.step(optimizer, clip_coefficient(master.grad_norm(), 1.0))
            return
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if master is not None:
            master.refresh()

    start = time.process_time()
    step()  # warm-up (and compilation)
    compile_s = time.process_time() - start if job.get("compile") else 0.0
    from torch.profiler import ProfilerActivity, profile

    walls, cpus = [], []
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(job["steps"]):  # the fastest step: the least disturbed by other processes
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    wall, cpu = min(walls), min(cpus)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / job["steps"]
    ctx = profile(activities=[ProfilerActivity.CPU]) if job["profile"] else contextlib.nullcontext()
    with ctx as prof:
        step()
    buckets: dict[str, float] = {}
    top = []
    if job["profile"]:
        events = prof.key_averages()
        for e in events:
            if e.self_cpu_time_total <= 0:
                continue
            b = bucket_of(e.key)
            buckets[b] = buckets.get(b, 0.0) + e.self_cpu_time_total / 1e6
        top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:25]
        top = [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "calls": e.count} for e in top]
    return {
        **job,
        "step_s": wall,
        "step_cpu_s": cpu,
        "page_faults_per_step": faults,
        "warmup_cpu_s": compile_s,
        "positions": int(batch["input_ids"].numel()),
        "buckets_s": buckets,
        "top_ops": top,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paths", default="autocast,weights")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--shapes", default="short49,long256")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--reference", choices=("cached", "live"), default="cached")
    parser.add_argument("--attn", default="sdpa", help="comma-separated attention kernels")
    parser.add_argument("--steps", type=int, default=2, help="timed steps (the fastest counts)")
    parser.add_argument("--no-profile", action="store_true", help="time the step only")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile every decoder layer (a trial)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    runs = []
    for shape in args.shapes.split(","):
        for threads in (int(t) for t in args.threads.split(",")):
            for path, attn in itertools.product(args.paths.split(","), args.attn.split(",")):
                job = dict(
                    shape=shape,
                    threads=threads,
                    path=path,
                    attn=attn,
                    model=args.model,
                    reference=args.reference,
                    steps=args.steps,
                    profile=not args.no_profile,
                    compile=args.compile,
                )
                env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
                proc = subprocess.run(
                    [sys.executable, __file__, "--worker", json.dumps(job)],
                    env=env,
                    capture_output=True,
                    text=True,
                )
                if proc.returncode != 0:
                    raise RuntimeError(f"{job} failed:\n{proc.stderr[-4000:]}")
                run = json.loads(proc.stdout.strip().splitlines()[-1])
                runs.append(run)
                total = sum(run["buckets_s"].values()) or 1.0
                shares = "  ".join(
                    f"{b} {s / total:.0%}"
                    for b, s in sorted(run["buckets_s"].items(), key=lambda kv: -kv[1])
                )
                print(
                    f"{shape:<9}{threads} thr {path:<9}{attn:<6} step {run['step_s']:6.2f} s "
                    f"({run['step_cpu_s']:6.2f} cpu-s, {run['positions']} positions, "
                    f"{run['page_faults_per_step'] / 1e3:.0f}k faults)  {shares}",
                    flush=True,
                )
    result = {
        "command": "python bench/bf16_profile.py " + " ".join(sys.argv[1:]),
        "load_avg_1m": os.getloadavg()[0],
        "runs": runs,
    }
    write_results(args.out, result)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
