"""What GenARM's sentiment ARM learns on SmolLM2, trained exactly as the real demo trains it, and
the experiments that find why it learns to stop less.

    PREFALIGN_CACHE=... python bench/smol_arm.py [--pairs all|chosen-longer|chosen-shorter]
        [--anchored] [--stats-only] [--brevity] [key=value ARM config overrides ...]

Prints, as one JSON line: the learning curve (loss and pair accuracy of each step's batch
before its update, i.e. on pairs not seen yet, first against last third of the epoch), and the
pair accuracy (the ARM's implied reward `beta_r * log pi(y|x)` ranking chosen over rejected) of
SmolLM2 and of the trained ARM on the world's training and held-out pairs, in the dtype the
ARM trains in; each model's mean log P(EOS) at the end of the training and held-out replies;
the modules the LoRA adapter adapts. The SmolLM2 sentiment world is built first if missing.

- `--pairs chosen-longer` / `chosen-shorter`: train on the pairs whose chosen reply has more
  (fewer) tokens than the rejected one only.
- `--anchored`: the same LoRA, data and schedule with GenARM's loss measured against frozen
  SmolLM2, i.e. DPO at beta = beta_r (Rafailov et al., 2023): what a reference changes.
- `--brevity`: the brevity ARM's pairs instead (each training reply against its own first
  clause, labelled by brevity, as the demo builds them); held-out figures stay sentiment's.
- `--stats-only`: no training; SmolLM2's statistics of the pairs under the training pipeline's
  tokenization: token lengths, the summed log-prob margin with and without the EOS term,
  log P(EOS) at the end of each reply, whether tokenizing prompt and reply together gives the
  same ids (an offset bug would show), and how the Bradley-Terry loss's initial gradient weight
  `sigmoid(-beta_r * margin)` splits between pairs whose chosen reply is longer or shorter.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from prefalign.config import load_config
from prefalign.data import load_preference_data, tokenize_preference
from prefalign.demo.smol_genarm import arm_overrides, fit_lora_arm, learning_curve
from prefalign.demo.smollm2 import SmolDemoSettings
from prefalign.genarm.arm import arm_pair_accuracy, concise_pairs
from prefalign.io import read_jsonl, write_jsonl
from prefalign.logprobs import token_logps
from prefalign.modeling import load_model, load_tokenizer
from prefalign.smol.rewards import brevity_reward
from prefalign.smol.world import get_smol_world
from prefalign.training.preference import PreferenceConfig, PreferenceData, run_preference

BETA_R = 0.1  # the demo's (demo/smol_genarm.py)
DATA = PreferenceData(max_length=128, max_prompt_length=64)  # demo/smol_limits.py


def eos_logp(model, tokenizer, pairs_path: Path) -> float:
    """Mean log P(EOS | prompt + reply) over the replies of the pairs: whether a model still
    stops where SmolLM2's own replies stopped (the world keeps only replies that did)."""
    values = []
    with torch.no_grad():
        for row in read_jsonl(pairs_path):
            for reply in (row["chosen"], row["rejected"]):
                ids = tokenizer(row["prompt"] + reply, add_special_tokens=False).input_ids
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
                values.append(torch.log_softmax(logits, -1)[tokenizer.eos_token_id].item())
    return round(sum(values) / len(values), 3)


def tokenized(tokenizer, path: Path):
    records = load_preference_data(path, tokenizer=tokenizer).records
    pairs, _ = tokenize_preference(records, tokenizer, **DATA.limits())
    return records, pairs


def subset(tokenizer, src: Path, dst: Path, which: str) -> int:
    """The pairs of `src` whose chosen reply is longer (or shorter) in training tokens."""
    records, pairs = tokenized(tokenizer, src)
    keep = [
        {"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected}
        for r, p in zip(records, pairs, strict=True)
        if (len(p.chosen_ids) > len(p.rejected_ids)) == (which == "chosen-longer")
        and len(p.chosen_ids) != len(p.rejected_ids)
    ]
    write_jsonl(dst, keep)
    return len(keep)


def response_logps(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0, :-1]
    return token_logps(logits, ids[0, 1:])[len(prompt) - 1 :]


def pair_stats(model, tokenizer, path: Path) -> dict:
    records, pairs = tokenized(tokenizer, path)
    rows = []
    with torch.no_grad():
        for record, pair in zip(records, pairs, strict=True):
            c = response_logps(model, pair.prompt_ids, pair.chosen_ids)
            r = response_logps(model, pair.prompt_ids, pair.rejected_ids)
            joint = tokenizer(record.prompt + record.chosen, add_special_tokens=False).input_ids
            rows.append(
                {
                    "longer": len(pair.chosen_ids) > len(pair.rejected_ids),
                    "shorter": len(pair.chosen_ids) < len(pair.rejected_ids),
                    "tokens_c": len(pair.chosen_ids),
                    "tokens_r": len(pair.rejected_ids),
                    "margin": float(c.sum() - r.sum()),
                    "margin_no_eos": float(c[:-1].sum() - r[:-1].sum()),
                    "eos_c": float(c[-1]),
                    "eos_r": float(r[-1]),
                    "ends_in_eos": pair.chosen_ids[-1]
                    == pair.rejected_ids[-1]
                    == tokenizer.eos_token_id,
                    "joint_same": joint == pair.prompt_ids + pair.chosen_ids[:-1],
                }
            )

    def mean(key: str, rows=rows) -> float:
        return round(sum(x[key] for x in rows) / max(1, len(rows)), 3)

    weight = [torch.sigmoid(torch.tensor(-BETA_R * x["margin"])).item() for x in rows]
    longer = [x["longer"] for x in rows]
    return {
        "pairs": len(rows),
        "chosen_longer": sum(longer),
        "chosen_shorter": sum(x["shorter"] for x in rows),
        "both_end_in_eos": sum(x["ends_in_eos"] for x in rows),
        "joint_tokenization_same": sum(x["joint_same"] for x in rows),
        "tokens_chosen": mean("tokens_c"),
        "tokens_rejected": mean("tokens_r"),
        "margin": mean("margin"),
        "margin_without_eos": mean("margin_no_eos"),
        "margin_chosen_longer": mean("margin", [x for x in rows if x["longer"]]),
        "margin_chosen_shorter": mean("margin", [x for x in rows if x["shorter"]]),
        "eos_logp_chosen": mean("eos_c"),
        "eos_logp_rejected": mean("eos_r"),
        "pairs_below_minus_1_over_beta_r": sum(x["margin"] < -1 / BETA_R for x in rows),
        "gradient_weight_share_chosen_longer": round(
            sum(w for w, g in zip(weight, longer, strict=True) if g) / sum(weight), 3
        ),
    }


def adapted_modules(model_path: Path) -> list[str]:
    config = json.loads((model_path / "adapter_config.json").read_text())
    return sorted(config["target_modules"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", choices=("all", "chosen-longer", "chosen-shorter"))
    parser.add_argument("--anchored", action="store_true")
    parser.add_argument("--stats-only", action="store_true")
    parser.add_argument("--brevity", action="store_true")
    args, extra = parser.parse_known_args()
    world = get_smol_world("sentiment")
    tokenizer = load_tokenizer(world.policy_path)
    pairs, held_out = world.file("pairs.jsonl"), world.file("pairs_eval.jsonl")
    out = Path(tempfile.mkdtemp(prefix="smol-arm-"))
    if args.brevity:
        concise_pairs(pairs, out / "pairs_brevity.jsonl", brevity_reward, seed=0)
        pairs = out / "pairs_brevity.jsonl"
    if args.stats_only:
        model = load_model(world.policy_path, dtype="bfloat16", device="cpu").eval()
        stats = {
            split: pair_stats(model, tokenizer, f)
            for split, f in (("train", pairs), ("held_out", held_out))
        }
        print(json.dumps(stats))
        shutil.rmtree(out, ignore_errors=True)
        return
    settings = SmolDemoSettings.make(False, out)
    result: dict = {"extra": extra, "pairs": args.pairs or "all", "anchored": args.anchored}
    result["brevity"] = args.brevity
    if args.pairs not in (None, "all"):
        result["train_pairs"] = subset(tokenizer, pairs, out / "pairs.jsonl", args.pairs)
        pairs = out / "pairs.jsonl"
    wall, cpu = time.time(), time.process_time()
    if args.anchored:
        overrides = arm_overrides(world, settings, pairs, held_out, out / "arm")
        overrides += ["objective.name=dpo", f"objective.params={{beta: {BETA_R}}}"]
        overrides += ["reference.mode=frozen", *extra]
        train = run_preference(load_config(PreferenceConfig, None, overrides), log=lambda *_: None)
        model_path = out / "arm" / "final"
    else:
        fit = fit_lora_arm(world, settings, pairs, held_out, out / "arm", extra)
        train, model_path = fit.train, fit.model_path
    result["train_seconds"] = {
        "wall": round(time.time() - wall, 1),
        "cpu": round(time.process_time() - cpu, 1),
    }
    result.update(steps=train.steps, curve=learning_curve(train.history))
    result["lora_target_modules"] = adapted_modules(model_path)
    accuracy = {}
    for name, path in (("smollm2", world.policy_path), ("arm", model_path)):
        model = load_model(path, dtype="bfloat16", device="cpu").eval()
        for split, file in (("train", pairs), ("held_out", held_out)):
            accuracy[f"{name}_eos_logp_{split}"] = eos_logp(model, tokenizer, file)
            # beta_r > 0 only scales the margins: their signs need none
            accuracy[f"{name}_{split}"] = round(
                arm_pair_accuracy(model, tokenizer, file, 1.0, DATA), 4
            )
    result["pair_accuracy"] = accuracy
    print(json.dumps(result))
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
