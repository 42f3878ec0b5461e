"""Where a full fine-tuning step's memory goes: resident memory after the forward, the backward
and the optimizer step, with the optimizer stepped after backward or inside it.

    .venv/bin/python bench/step_memory.py [--lean] [--threshold-kib 1024] [--inside]
        [--checkpointing]

One process per configuration (ru_maxrss is a process's peak): SmolLM2-135M-Instruct, the
policy half of a DPO step (fused AdamW, no clipping) on 4 smol-chat pairs in shared-prompt rows,
4 steps, 1 thread. `--inside` steps each parameter inside backward
(`prefalign.training.step_in_backward`); `--checkpointing` recomputes activations in backward;
`--lean` takes the lean RMSNorm / MLP forwards (`prefalign.training.lean_activations`, the
trainer's default). `--threshold-kib N` fixes glibc's mmap threshold as the trainer does
(`trainer.malloc_mmap_threshold_kib`): every buffer of N KiB or more is returned to the system
when freed, so the resident figures are close to live memory; without it (glibc's adaptive
threshold) freed buffers stay in the heap and the peak also holds what the allocator kept.
Prints one line per step (what autograd saved for backward, weights excluded; resident
memory after each phase; peak; CPU seconds; page faults) and writes nothing.

    .venv/bin/python bench/step_memory.py --trainer smol-short/frozen [--steps 3]

`--trainer SIZE/VARIANT` runs instead one whole prefalign run of a `train_throughput.py` row
as that bench runs it (its sizes and variants, 1 thread, one warm-up step less), and splits
its resident peak by phase: the process before the model, loading, the reference cache, then
every step's forward, backward, clipping, optimizer step and reference update. For each phase:
the resident memory and the live tensor bytes at its end, and the process peak (ru_maxrss) at
its end, so the phase that set the final peak is the first whose peak reaches it; beside them
the run's memory floor (`prefalign.training.memory_floor`). Writes
bench/results/step_memory_<size>_<variant>.json.
"""

from __future__ import annotations

import argparse
import random
import resource
import sys
import time
import warnings
from functools import partial
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pack(saved: dict[int, int], weights: set[int], t: torch.Tensor) -> torch.Tensor:
    """A saved-tensor hook that records the bytes of each storage autograd keeps (weights
    excluded)."""
    storage = t.untyped_storage()
    if storage.data_ptr() not in weights:
        saved[storage.data_ptr()] = storage.nbytes()
    return t


def trainer_phases(row: str, steps: int | None, out: Path | None) -> None:
    """One prefalign run of a train_throughput.py row, its memory split by phase (docstring)."""
    import tempfile

    import train_throughput as bench
    from accelerate import Accelerator
    from results_json import run_header, write_results

    from prefalign.training import clip_step, memory_floor, ref_cache
    from prefalign.training import preference as pref
    from prefalign.training.bf16_weights import Bf16MasterWeights
    from prefalign.training.loop import Trainer

    size, variant = row.split("/", 1)
    bench.parse_variant(variant)
    torch.set_num_threads(1)
    # The marked optimizer.step below replaces the one the LR scheduler wrapped: it warns.
    warnings.filterwarnings("ignore", message="Seems like `optimizer.step()` has been overridden")
    phases: list[dict] = []
    step = [0]

    def mark(name: str, **more) -> None:
        live = memory_floor.live_tensor_storages()
        phases.append(
            {
                "phase": name,
                "step": step[0],
                "resident_mb": resident_mb(),
                "peak_mb": peak_mb(),
                "live_tensors_mb": sum(live.values()) / 2**20,
                **more,
            }
        )

    def after(name: str, fn):
        def marked(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            finally:
                mark(name)

        return marked

    load_model, build_cache, fit = pref.load_model, ref_cache.build_reference_cache, Trainer.fit

    def marked_load_model(*args, **kwargs):
        mark("before the model")
        return after("model loaded", load_model)(*args, **kwargs)

    def marked_fit(self, collate, loss_fn, after_step=None, **kwargs):
        def forward(model, batch):
            saved: dict[int, int] = {}
            weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
            with torch.autograd.graph.saved_tensors_hooks(
                partial(pack, saved, weights), lambda t: t
            ):
                result = loss_fn(model, batch)
            mark("forward", saved_for_backward_mb=sum(saved.values()) / 2**20)
            return result

        def stepped(n: int):
            try:
                return after_step(n) if after_step is not None else None
            finally:
                mark("reference update, grads freed")
                step[0] = n

        self.accelerator.backward = after("backward", self.accelerator.backward)
        self.optimizer.step = after("optimizer step", self.optimizer.step)
        return fit(self, collate, forward, after_step=stepped, **kwargs)

    pref.load_model, ref_cache.build_reference_cache = (
        marked_load_model,
        after("reference cache", build_cache),
    )
    Trainer.fit = marked_fit
    Accelerator.clip_grad_norm_ = after("clipping", Accelerator.clip_grad_norm_)
    clip_step.grad_norm = after("clipping (norm)", clip_step.grad_norm)
    Bf16MasterWeights.grad_norm = after("clipping (bf16 norm)", Bf16MasterWeights.grad_norm)
    Bf16MasterWeights.step = after("optimizer step (bf16 masters)", Bf16MasterWeights.step)
    with tempfile.TemporaryDirectory(prefix="step-memory-") as tmp:
        if steps:
            bench.SIZES[size] = {**bench.SIZES[size], "warmup": 1, "steps": steps - 1}
        spec = bench.build_workspace(Path(tmp), [size])[size]
        extra: dict = {}
        bench.run_prefalign(spec, variant, f"{tmp}/run", [], [], extra)
    floor = extra["baseline_rss_mb"] + sum(extra["floor_parts"].values()) / 2**20
    final = peak_mb()
    at_peak = next(p for p in phases if p["peak_mb"] >= final)
    print(f"{row}: peak {final:.0f} MB, floor {floor:.0f} MB (gap {final - floor:.0f})")
    print(f"{'step':>4}  {'phase':<34}{'resident':>9}{'live tensors':>13}{'peak':>7}{'saved':>7}")
    for p in phases:
        print(
            f"{p['step']:>4}  {p['phase']:<34}{p['resident_mb']:>9.0f}{p['live_tensors_mb']:>13.0f}"
            f"{p['peak_mb']:>7.0f}"
            + (f"{p['saved_for_backward_mb']:>7.0f}" if "saved_for_backward_mb" in p else "")
            + ("  <- the peak was set here" if p is at_peak else "")
        )
    result = {
        **run_header(__file__, 1),
        "row": row,
        "peak_mb": final,
        "floor_mb": floor,
        "baseline_rss_mb": extra["baseline_rss_mb"],
        "floor_parts_mb": {k: v / 2**20 for k, v in extra["floor_parts"].items()},
        "peak_set_in": {"phase": at_peak["phase"], "step": at_peak["step"]},
        "phases": phases,
    }
    out = out or RESULTS / f"step_memory_{size}_{variant.replace('+', '_')}.json"
    write_results(out, result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inside", action="store_true", help="step inside backward")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    parser.add_argument(
        "--steps", type=int, default=None, help="steps (default 4; --trainer: the row's)"
    )
    parser.add_argument(
        "--threshold-kib", type=int, default=0, help="fix glibc's mmap threshold (0: adaptive)"
    )
    parser.add_argument("--lean", action="store_true", help="lean RMSNorm / MLP activations")
    parser.add_argument("--trim", action="store_true", help="malloc_trim(0) after each step")
    parser.add_argument(
        "--trim-before-backward", action="store_true", help="malloc_trim(0) before backward"
    )
    parser.add_argument(
        "--prealloc", action="store_true", help="create Adam's state before the first step"
    )
    parser.add_argument(
        "--trainer",
        metavar="SIZE/VARIANT",
        help="a train_throughput.py row (e.g. smol-short/frozen): its run's memory by phase",
    )
    parser.add_argument("--out", type=Path, default=None, help="with --trainer: the JSON path")
    args = parser.parse_args()
    if args.trainer:
        trainer_phases(args.trainer, args.steps, args.out)
        return
    torch.set_num_threads(1)
    from prefalign.training import malloc

    malloc.set_mmap_threshold(args.threshold_kib)
    from train_throughput import SEED, make_chat_pairs

    from prefalign.data.records import PreferenceRecord
    from prefalign.data.tokenize import tokenize_preference
    from prefalign.modeling import load_model, load_tokenizer
    from prefalign.models import SMOLLM2, resolve_model_source
    from prefalign.shared_prompt import collate_shared_pairs, pair_logps
    from prefalign.training.step_in_backward import StepInBackward

    source = resolve_model_source(SMOLLM2)
    tokenizer = load_tokenizer(source)
    policy = load_model(
        source, device="cpu", gradient_checkpointing=args.checkpointing, lean_activations=args.lean
    ).train()
    rows = make_chat_pairs(random.Random(SEED + 1), 4, tokenizer)
    records = [
        PreferenceRecord(r["prompt"], r["chosen"], r["rejected"], "bench", i + 1)
        for i, r in enumerate(rows)
    ]
    pairs, _ = tokenize_preference(records, tokenizer, max_length=256, max_prompt_length=255)
    batch = collate_shared_pairs(
        [p.prompt_ids for p in pairs],
        [p.chosen_ids for p in pairs],
        [p.rejected_ids for p in pairs],
        tokenizer.pad_token_id,
    )
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6, fused=True)
    if args.inside:
        StepInBackward(optimizer, lambda norm: sys.exit(f"non-finite gradient {norm}"))
    weights = {p.untyped_storage().data_ptr() for p in policy.parameters()}
    print(f"loaded: resident {resident_mb():.0f} MB", flush=True)
    for step in range(args.steps or 4):
        start, faults = time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        saved: dict[int, int] = {}  # storage -> bytes autograd keeps for backward
        with torch.autograd.graph.saved_tensors_hooks(partial(pack, saved, weights), lambda t: t):
            chosen, rejected = pair_logps(policy, batch)
        loss = -torch.nn.functional.logsigmoid(0.1 * (chosen.sum - rejected.sum)).mean()
        after_forward = resident_mb()
        if args.trim_before_backward:
            malloc.glibc().malloc_trim(0)
        loss.backward()
        after_backward = resident_mb()
        if not args.inside:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        print(
            f"step {step}: saved for backward {sum(saved.values()) / 2**20:.0f} MB, "
            f"resident after forward {after_forward:.0f} MB, after backward "
            f"{after_backward:.0f} MB, after the step {resident_mb():.0f} MB, peak "
            f"{peak_mb():.0f} MB, {time.process_time() - start:.2f} CPU s, {faults} page faults",
            flush=True,
        )


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
