"""`prefalign rm train`: a Bradley-Terry reward model (Ouyang et al. 2022) on preference pairs.

The model is `AutoModelForSequenceClassification` with one label, built from the policy's
checkpoint (its transformer weights; the scalar head starts fresh). One stacked [chosen; rejected]
batch goes through it, and the loss is `-log sigmoid(r_chosen - r_rejected)`. Held-out pair
accuracy (the share of pairs it ranks as labelled) is the figure that says whether it learned.

Sequences have the layout of every other method (`[BOS] prompt | response [EOS]`), tokenized by
the same code for training and scoring; rewards are read by `reader.sequence_rewards`, at the
last attended position, the same reading ReST scoring, ARGS and best-of-N use.
"""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from transformers import PreTrainedModel

from prefalign.config import ConfigError
from prefalign.data import TokenizedPair, collate_pairs, load_preference_data, tokenize_preference
from prefalign.manifest import write_manifest
from prefalign.modeling import ModelSpec, check_device, load_tokenizer, resolve_dtype
from prefalign.reward_models.reader import (
    SequenceRewardModel,
    as_sequence_reward_model,
    sequence_rewards,
)
from prefalign.training.loop import Trainer, TrainerConfig, TrainResult
from prefalign.training.preference import PreferenceData


@dataclass
class RMData(PreferenceData):
    """The preference-training data settings; without `eval_path`, `eval_fraction` of `path`
    is held out to measure pair accuracy."""

    eval_fraction: float = 0.1


@dataclass
class RewardModelConfig:
    model: ModelSpec = field(default_factory=ModelSpec)  # the backbone: usually the SFT policy
    data: RMData = field(default_factory=RMData)
    # Dropout off, as TRL's RewardTrainer (`trainer.disable_dropout=false` keeps it).
    trainer: TrainerConfig = field(
        default_factory=lambda: TrainerConfig(out_dir="runs/rm", lr=1e-4, disable_dropout=True)
    )


@dataclass
class RMResult:
    accuracy: float  # held-out pair accuracy
    margin: float  # mean r_chosen - r_rejected on held-out pairs
    n_eval: int
    train: TrainResult
    path: Path  # the model to pass as reward.model_path


def build_reward_model(
    name_or_path: str | Path, pad_token_id: int, dtype: str = "float32", seed: int = 0
) -> PreTrainedModel:
    """A one-label sequence classifier on the checkpoint's backbone; the head is seeded."""
    from transformers import AutoModelForSequenceClassification

    from prefalign.models import resolve_model_source

    torch.manual_seed(seed)
    with quiet_load_report():  # the head is new and the LM head unused, as intended: no warning
        model = AutoModelForSequenceClassification.from_pretrained(
            str(resolve_model_source(name_or_path)), num_labels=1, dtype=resolve_dtype(dtype)
        )
    # Not used for reading (the attention mask is), but HF's own pooling needs it to be set.
    model.config.pad_token_id = pad_token_id
    return model


@contextlib.contextmanager
def quiet_load_report() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def rewards_of(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Rewards [B] of a collated batch; `model` a classifier or a `SequenceRewardModel`."""
    return sequence_rewards(
        as_sequence_reward_model(model), batch["input_ids"], batch["attention_mask"]
    )


def bt_loss_fn(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry loss of a stacked [chosen; rejected] batch."""
    chosen, rejected = rewards_of(model, batch).chunk(2)
    margin = chosen - rejected
    metrics = {"accuracy": (margin > 0).float().mean(), "margin": margin.detach().mean()}
    return -F.logsigmoid(margin).mean(), metrics


@torch.no_grad()
def pair_accuracy(
    model: torch.nn.Module, pairs: Sequence[TokenizedPair], pad_id: int, batch_size: int = 32
) -> tuple[float, float]:
    """(share of pairs with r_chosen > r_rejected, mean margin)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    margins = []
    for s in range(0, len(pairs), batch_size):
        batch = {
            k: v.to(device) for k, v in collate_pairs(pairs[s : s + batch_size], pad_id).items()
        }
        chosen, rejected = rewards_of(model, batch).chunk(2)
        margins.append((chosen - rejected).cpu())
    model.train(was_training)
    if not margins:
        return float("nan"), float("nan")
    m = torch.cat(margins)
    return float((m > 0).float().mean()), float(m.mean())


def split_held_out(
    pairs: list[TokenizedPair], fraction: float, seed: int
) -> tuple[list[TokenizedPair], list[TokenizedPair]]:
    if not 0 < fraction < 1:
        raise ConfigError(f"config key 'data.eval_fraction' must lie in (0, 1), got {fraction}")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(len(pairs) * fraction))
    return [pairs[i] for i in order[n_eval:]], [pairs[i] for i in order[:n_eval]]


def train_reward_model(config: RewardModelConfig, resume: bool = False, log=print) -> RMResult:
    """Train on `data.path`, report held-out pair accuracy, write `rm_metrics.json` beside
    `final/`."""
    if not config.model.name_or_path:
        raise ConfigError(
            "config key 'model.name_or_path' is required (the backbone, e.g. the SFT policy)"
        )
    if not config.data.path:
        raise ConfigError("config key 'data.path' is required (preference pairs)")
    if config.model.lora is not None:
        raise ConfigError(
            "config key 'model.lora': LoRA reward models are not supported; train the full model"
        )
    check_device(config.model.device)  # before anything loads
    write_manifest(config.trainer.out_dir, "rm")
    tokenizer = load_tokenizer(config.model.name_or_path)
    trunc = dict(**config.data.limits(), skip_invalid=config.data.skip_invalid)

    def load_pairs(path: str) -> list[TokenizedPair]:
        loaded = load_preference_data(
            path, tokenizer=tokenizer, skip_invalid=config.data.skip_invalid
        )
        pairs, skipped = tokenize_preference(loaded.records, tokenizer, **trunc)
        if loaded.skipped + skipped:
            log(f"skipped {sum((loaded.skipped + skipped).values())} invalid rows of {path}")
        return pairs

    train_pairs = load_pairs(config.data.path)
    if config.data.eval_path:
        eval_pairs = load_pairs(config.data.eval_path)
    else:
        train_pairs, eval_pairs = split_held_out(
            train_pairs, config.data.eval_fraction, config.trainer.seed
        )

    classifier = build_reward_model(
        config.model.name_or_path, tokenizer.pad_token_id, config.model.dtype, config.trainer.seed
    )
    # The Trainer runs the per-position reader's forward, so data-parallel wrappers see it.
    model = SequenceRewardModel(classifier)
    trainer = Trainer(
        model,
        config.trainer,
        [p.length for p in train_pairs],
        run_config=asdict(config),
        tokenizer=tokenizer,
        device=config.model.device,
    )
    if resume:
        trainer.resume()
    pad = tokenizer.pad_token_id

    def evaluate(step: int) -> dict[str, float]:
        return dict(
            zip(
                ("accuracy", "margin"),
                pair_accuracy(trainer.unwrapped, eval_pairs, pad),
                strict=True,
            )
        )

    result = trainer.fit(
        lambda idx: collate_pairs([train_pairs[i] for i in idx], pad),
        bt_loss_fn,
        evaluate=evaluate,
    )
    trainer.end()
    last = result.history[-1] if result.history else {}
    if "eval/accuracy" in last:  # the Trainer evaluated the final step already
        accuracy, margin = last["eval/accuracy"], last["eval/margin"]
    else:  # resumed a run that had finished: nothing was trained or evaluated
        accuracy, margin = pair_accuracy(trainer.unwrapped, eval_pairs, pad)
    out = Path(config.trainer.out_dir)
    metrics = {
        "held_out_pair_accuracy": accuracy,
        "held_out_margin": margin,
        "n_eval_pairs": len(eval_pairs),
        "n_train_pairs": len(train_pairs),
        "steps": result.steps,
        "seconds": round(result.seconds, 2),
    }
    (out / "rm_metrics.json").write_text(json.dumps(metrics, indent=2))
    log(
        f"reward model: held-out pair accuracy {accuracy:.3f} on {len(eval_pairs)} pairs "
        f"(margin {margin:.3f}); model in {out / 'final'}"
    )
    return RMResult(accuracy, margin, len(eval_pairs), result, out / "final")
