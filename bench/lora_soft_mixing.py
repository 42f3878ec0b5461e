"""How exact is the LoRA soft trust-region reference? Measured on a real DPO run.

Trains a LoRA policy with DPO against a soft reference (TR-DPO, alpha 0.6 every step) and, at
every update, compares each LoRA layer's reference weight update with the exact mixture
`D_ref <- a*D + (1-a)*D_ref` of the dense updates D = s*B@A, tracked on the side in float64:

- `product rank R`: prefalign's reference adapter (the mixed product recompressed to rank R,
  R = r, 2r, 4r; 4r is the default `reference.lora_rank`);
- `factor mixing`: the previous scheme, mixing A and B separately.

The error is ||D_ref - D_exact||_F / ||D_exact||_F over all layers together. Also timed: one
soft update of each scheme. Writes bench/results/lora_soft_mixing.json.

    PYTHONPATH=src .venv/bin/python bench/lora_soft_mixing.py --model DIR --pairs FILE [--steps 64]

(DIR/FILE: a toy world's policy/ and pairs.jsonl, e.g. under ~/.cache/prefalign/toy/sentiment-*.)
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from results_json import write_results

from prefalign.data import collate_pairs, load_preference_data, tokenize_preference
from prefalign.logprobs import sequence_logps, split_pairs
from prefalign.lora_mix import copy_factors_, mix_layers_
from prefalign.modeling import LoraSpec, load_model, load_tokenizer
from prefalign.reference import ReferenceSpec, make_reference

ALPHA, BETA = 0.6, 0.1
RESULTS = Path(__file__).parent / "results" / "lora_soft_mixing.json"


def lora_layers(model) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    return [
        (m.lora_A["default"].weight, m.lora_B["default"].weight, m.scaling["default"])
        for m in model.modules()
        if "default" in getattr(m, "lora_A", {})
    ]


class Shadow:
    """One way of keeping a reference update per layer, updated beside the real run."""

    def __init__(self, layers, rank: int | None) -> None:
        self.rank = rank  # None: factor mixing at the policy's rank
        self.factors = []
        for a, b, _ in layers:
            r = rank or a.shape[0]
            a_ref, b_ref = torch.zeros(r, a.shape[1]), torch.zeros(b.shape[0], r)
            copy_factors_(a_ref, b_ref, a.detach(), b.detach())
            self.factors.append((a_ref, b_ref))

    @torch.no_grad()
    def update(self, layers) -> None:
        if self.rank is not None:
            mix_layers_(
                [(*ref, a, b) for ref, (a, b, _) in zip(self.factors, layers, strict=True)], ALPHA
            )
            return
        for (a_ref, b_ref), (a, b, _) in zip(self.factors, layers, strict=True):
            a_ref.lerp_(a, ALPHA)
            b_ref.lerp_(b, ALPHA)

    def updates(self, layers) -> list[torch.Tensor]:
        return [
            s * b_ref.double() @ a_ref.double()
            for (a_ref, b_ref), (_, _, s) in zip(self.factors, layers, strict=True)
        ]


def relative_error(got: list[torch.Tensor], exact: list[torch.Tensor]) -> float:
    num = sum(float((g - e).square().sum()) for g, e in zip(got, exact, strict=True))
    den = sum(float(e.square().sum()) for e in exact)
    return (num / den) ** 0.5


def timed(fn, repeats: int = 10) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--pairs", required=True)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, device="cpu", lora=LoraSpec(r=args.rank, alpha=2 * args.rank))
    records = load_preference_data(args.pairs, tokenizer=tokenizer).records
    pairs, _ = tokenize_preference(records, tokenizer, max_length=128, max_prompt_length=64)
    reference = make_reference(model, ReferenceSpec(mode="soft", alpha=ALPHA))
    layers = lora_layers(model)
    ranks = [args.rank, 2 * args.rank, 4 * args.rank]
    shadows = {f"product rank {r}": Shadow(layers, r) for r in ranks} | {
        "factor mixing": Shadow(layers, None)
    }
    exact = [s * b.detach().double() @ a.detach().double() for a, b, s in layers]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    errors: dict[str, list[float]] = {name: [] for name in shadows}
    errors["prefalign reference (default)"] = []
    model.train()
    step_seconds = []
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        start = (step - 1) * args.batch % (len(pairs) - args.batch)
        batch = collate_pairs(pairs[start : start + args.batch], tokenizer.pad_token_id)
        inputs = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
        chosen, rejected = split_pairs(sequence_logps(model, *inputs))
        ref_chosen, ref_rejected = split_pairs(reference.logps(*inputs))
        z = (chosen.sum - rejected.sum) - (ref_chosen.sum - ref_rejected.sum)
        loss = -F.logsigmoid(BETA * z).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step_seconds.append(time.perf_counter() - t0)
        reference.after_optimizer_step(step)
        for shadow in shadows.values():
            shadow.update(layers)
        current = [s * b.detach().double() @ a.detach().double() for a, b, s in layers]
        exact = [ALPHA * c + (1 - ALPHA) * e for c, e in zip(current, exact, strict=True)]
        for name, shadow in shadows.items():
            errors[name].append(relative_error(shadow.updates(layers), exact))
        ref_updates = [
            m.scaling["reference"]
            * m.lora_B["reference"].weight.double()
            @ m.lora_A["reference"].weight.double()
            for m in model.modules()
            if "reference" in getattr(m, "lora_A", {})
        ]
        errors["prefalign reference (default)"].append(relative_error(ref_updates, exact))

    seconds = {
        "factor mixing (lerp of A and B)": timed(lambda: shadows["factor mixing"].update(layers)),
        f"product rank {4 * args.rank} (QR + SVD)": timed(
            lambda: shadows[f"product rank {4 * args.rank}"].update(layers)
        ),
    }
    result = {
        "command": "bench/lora_soft_mixing.py "
        + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
        "machine": platform.processor() or platform.machine(),
        "threads": 1,
        "lora_layers": len(layers),
        "alpha": ALPHA,
        "updates": args.steps,
        "relative_error": {
            n: {"final": e[-1], "max": max(e), "after_1": e[0]} for n, e in errors.items()
        },
        "seconds_per_update": seconds,
        "seconds_per_training_step": sorted(step_seconds)[len(step_seconds) // 2],  # median
        "training_batch_pairs": args.batch,
    }
    print(f"{'scheme':34s} {'after 1':>10s} {'max':>10s} {'final':>10s}")
    for name, e in errors.items():
        print(f"{name:34s} {e[0]:10.2e} {max(e):10.2e} {e[-1]:10.2e}")
    for name, s in seconds.items():
        print(f"update time, {name}: {1000 * s:.1f} ms")
    print(
        f"training step (median, {args.batch} pairs): "
        f"{1000 * result['seconds_per_training_step']:.1f} ms"
    )
    write_results(RESULTS, result)


if __name__ == "__main__":
    main()
