"""ARM training: a causal LM fit to preference pairs with GenARM's reference-free objective.

The recipe is `prefalign train` with two defaults changed (objective `genarm`, reference
`none`): the trainer, data pipeline, LoRA and checkpoints are the preference trainer's own.
The ARM's implied reward is `r(x, y) = beta_r * log pi_arm(y | x)`; its quality is the share
of held-out pairs where r(chosen) > r(rejected).

With no reference, an ARM initialised from its base starts each pair at the base's margin,
which a length difference dominates (tens of nats against a sigmoid scale of 1/beta_r): the
loss stays linear on pairs whose chosen reply is longer and saturates on the others, so where
length predicts the label the ARM learns to stop less (a sum of log-probs can reward length only
by lowering EOS). bench/smol_arm.py measures this on SmolLM2.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from prefalign import objectives
from prefalign.config import ConfigError
from prefalign.evaluation.pairs import pair_metrics
from prefalign.io import FileContentError, read_jsonl, write_jsonl
from prefalign.manifest import write_manifest
from prefalign.reference import ReferenceSpec
from prefalign.tasks import PairFn as RewardFn
from prefalign.training.loop import TrainerConfig, TrainResult
from prefalign.training.preference import (
    ObjectiveSpec,
    PreferenceConfig,
    PreferenceData,
    resolve_objective,
    run_preference,
)


@dataclass
class ArmConfig(PreferenceConfig):
    """`prefalign arm train` config: a preference config whose objective defaults to genarm."""

    objective: ObjectiveSpec = field(default_factory=lambda: ObjectiveSpec(name="genarm"))
    reference: ReferenceSpec = field(default_factory=lambda: ReferenceSpec(mode="none"))
    # Dropout off, as in every preference run (`trainer.disable_dropout=false` keeps it).
    trainer: TrainerConfig = field(
        default_factory=lambda: TrainerConfig(out_dir="runs/arm", lr=5e-6, disable_dropout=True)
    )


@dataclass
class ArmResult:
    model_path: Path  # the trained ARM (save_pretrained, tokenizer included)
    train: TrainResult
    # held-out pairs ranked right by beta_r * log pi_arm; None without eval pairs
    pair_accuracy: float | None
    initial_pair_accuracy: float | None  # the same for the initial model, for contrast


def arm_objective(config: PreferenceConfig) -> objectives.Resolved:
    """The ARM objective resolved once for the run. A user file (`objective.code`) is an ARM
    loss, so it is loaded as one: reference-free, its reference arguments passed as zeros."""
    spec = config.objective
    if spec.code:
        objective = objectives.load_user_objective(spec.code, needs_reference=False)
        return objective.resolve(spec.params)
    return resolve_objective(spec)


def arm_beta(config: PreferenceConfig) -> float:
    """The ARM's reward scale (`beta_r` for genarm), as the config's objective resolves it."""
    return arm_objective(config).reward_scale


def check_arm_config(config: PreferenceConfig) -> objectives.Resolved:
    """An ARM is trained without a reference policy: refuse configs that would need one.
    Returns the objective, resolved once for the run (a user file is imported here)."""
    objective = arm_objective(config)
    if objective.needs_reference or objective.kind != "pairwise":
        raise ConfigError(
            f"config key 'objective.name': an ARM needs a pairwise objective with no reference "
            f"policy (e.g. genarm), got '{objective.name}'"
        )
    if config.reference.mode != "none":
        raise ConfigError(
            "config key 'reference.mode': an ARM is trained with no reference, "
            f"got '{config.reference.mode}'"
        )
    return objective


def train_arm(config: ArmConfig, resume: bool = False, log=print) -> ArmResult:
    """Train an ARM with the preference trainer; measure held-out pair accuracy before and after."""
    from prefalign.modeling import load_model, load_tokenizer

    objective = check_arm_config(config)
    beta_r = objective.reward_scale
    eval_path = config.data.eval_path
    initial = None
    if eval_path and not resume:
        tokenizer = load_tokenizer(config.model.name_or_path)
        initial = arm_pair_accuracy(
            load_model(config.model.name_or_path, dtype=config.model.dtype, device="cpu"),
            tokenizer,
            eval_path,
            beta_r,
            config.data,
        )
    result = run_preference(config, resume=resume, log=log, objective=objective)
    write_manifest(config.trainer.out_dir, "arm")
    final = Path(config.trainer.out_dir) / "final"
    accuracy = None
    if eval_path:
        # In the dtype it trained in: a bf16 run's weights, measured as they were trained.
        arm = load_model(final, dtype=config.model.dtype, device="cpu")
        accuracy = arm_pair_accuracy(arm, load_tokenizer(final), eval_path, beta_r, config.data)
    return ArmResult(final, result, accuracy, initial)


def arm_pair_accuracy(
    arm: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    pairs_path: str | Path,
    beta_r: float = 1.0,
    data: PreferenceData | None = None,
) -> float:
    """Share of pairs where the ARM's implied reward `beta_r * log pi_arm(y|x)` prefers chosen."""
    metrics = pair_metrics(arm, None, tokenizer, str(pairs_path), beta_r, data or PreferenceData())
    if not metrics:
        raise FileContentError(
            f"{pairs_path}: no usable preference pairs to measure ARM accuracy on"
        )
    return metrics["pair_accuracy"]


def first_clause(text: str) -> str | None:
    """The text cut after its first clause (at ' ,', ' .', ' and ', ' but '), ended with ' .';
    None when it has a single clause."""
    cuts = [i for sep in (" ,", " .", " and ", " but ") if (i := text.find(sep, 1)) > 0]
    if not cuts or min(cuts) >= len(text.rstrip(" .")):
        return None
    return text[: min(cuts)] + " ."


def concise_pairs(
    src: str | Path, dst: str | Path, reward: RewardFn, temperature: float = 0.15, seed: int = 0
) -> dict[str, float]:
    """Brevity pairs that differ only in where the response stops: a response against its own
    first clause, labelled by `reward` with Bradley-Terry noise (as `rerank_pairs`).

    Two unrelated responses let a sequence-level ARM prefer the shorter one by spreading mass
    over every token (a per-token cost), which next-token decoding normalizes away; a shared
    start leaves stopping early (the EOS token) as the difference to learn.
    """
    candidates = []
    for row in read_jsonl(src):
        for text in (row["chosen"], row["rejected"]):
            short = first_clause(text)
            if short is not None and short != text:
                candidates.append({"prompt": row["prompt"], "chosen": short, "rejected": text})
    return write_pairs(dst, *relabel(candidates, reward, temperature, seed))


def rerank_pairs(
    src: str | Path,
    dst: str | Path,
    reward: RewardFn,
    temperature: float = 0.15,
    seed: int = 0,
) -> dict[str, float]:
    """Relabel the responses of existing pairs by another reward, with Bradley-Terry noise."""
    return write_pairs(dst, *relabel(read_jsonl(src), reward, temperature, seed))


def relabel(
    rows: list[dict], reward: RewardFn, temperature: float, seed: int
) -> tuple[list[dict], dict[str, float]]:
    """Order each pair's two responses the way the toy world labels sentiment pairs: the first
    is chosen with probability sigmoid((r_a - r_b) / temperature). Ties are dropped (the
    labeller would flip a coin)."""
    rng = random.Random(seed)
    out, agree = [], 0
    for row in rows:
        a, b = row["chosen"], row["rejected"]
        ra, rb = reward(row["prompt"], a), reward(row["prompt"], b)
        if ra == rb:
            continue
        a_wins = rng.random() < 1 / (1 + math.exp(-(ra - rb) / temperature))
        chosen, rejected, rc, rr = (a, b, ra, rb) if a_wins else (b, a, rb, ra)
        agree += rc > rr
        out.append(
            {
                "prompt": row["prompt"],
                "chosen": chosen,
                "rejected": rejected,
                "chosen_reward": rc,
                "rejected_reward": rr,
            }
        )
    return out, {"pairs": len(out), "label_agreement": agree / max(1, len(out))}


def write_pairs(dst: str | Path, rows: list[dict], stats: dict[str, float]) -> dict[str, float]:
    write_jsonl(dst, rows)
    return stats
