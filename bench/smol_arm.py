"""What GenARM's sentiment ARM learns on SmolLM2, trained exactly as the real demo trains it.

    PREFALIGN_CACHE=... python bench/smol_arm.py [key=value ARM config overrides ...]

Prints, as one JSON line: the learning curve (loss and pair accuracy of each step's batch
before its update, i.e. on pairs not seen yet, first against last third of the epoch), and the
pair accuracy (the ARM's implied reward `beta_r * log pi(y|x)` ranking chosen over rejected) of
SmolLM2 and of the trained ARM on the world's training and held-out pairs, in the dtype the
ARM trains in; and each model's mean log P(EOS) at the end of the held-out replies. The SmolLM2
sentiment world is built first if the cache lacks it.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from prefalign.demo.smol_genarm import fit_lora_arm, learning_curve
from prefalign.demo.smollm2 import SmolDemoSettings
from prefalign.genarm.arm import arm_pair_accuracy
from prefalign.io import read_jsonl
from prefalign.modeling import load_model, load_tokenizer
from prefalign.smol.world import get_smol_world
from prefalign.training.preference import PreferenceData


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


def main() -> None:
    extra = sys.argv[1:]
    world = get_smol_world("sentiment")
    out = Path(tempfile.mkdtemp(prefix="smol-arm-"))
    settings = SmolDemoSettings.make(False, out)
    pairs, held_out = world.file("pairs.jsonl"), world.file("pairs_eval.jsonl")
    wall, cpu = time.time(), time.process_time()
    fit = fit_lora_arm(world, settings, pairs, held_out, out / "arm", extra)
    seconds = {"wall": round(time.time() - wall, 1), "cpu": round(time.process_time() - cpu, 1)}
    data = PreferenceData(max_length=128, max_prompt_length=64)  # demo/smol_limits.py
    tokenizer = load_tokenizer(world.policy_path)
    accuracy = {}
    for name, path in (("smollm2", world.policy_path), ("arm", fit.model_path)):
        model = load_model(path, dtype="bfloat16", device="cpu").eval()
        accuracy[f"{name}_eos_logp_held_out"] = eos_logp(model, tokenizer, held_out)
        for split, file in (("train", pairs), ("held_out", held_out)):
            # beta_r > 0 only scales the margins: their signs need none
            accuracy[f"{name}_{split}"] = round(
                arm_pair_accuracy(model, tokenizer, file, 1.0, data), 4
            )
    result = {
        "extra": extra,
        "steps": fit.train.steps,
        "train_seconds": seconds,
        "curve": learning_curve(fit.train.history),
        "pair_accuracy": accuracy,
    }
    print(json.dumps(result))
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
