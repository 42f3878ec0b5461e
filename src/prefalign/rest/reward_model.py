"""`prefalign rm train`: a Bradley-Terry reward model, and scoring with it.

The model is `AutoModelForSequenceClassification` with one label, built from the policy's
checkpoint (its transformer weights; the scalar head starts fresh). One stacked [chosen; rejected]
batch goes through it, and the loss is `-log sigmoid(r_chosen - r_rejected)`. Held-out pair
accuracy (the share of pairs it ranks as labelled) is the figure that says whether it learned.

Sequences have the layout of every other method (`[BOS] prompt | response [EOS]`), tokenized by
the same code for training and scoring; the reward is read at the last non-pad token.
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

from prefalign.data import (
    PromptCompletionRecord,
    TokenizedPair,
    collate_pairs,
    load_preference_data,
    tokenize_preference,
    tokenize_sft,
)
from prefalign.logprobs import collate_prompt_response
from prefalign.modeling import ModelSpec, load_tokenizer, resolve_device, resolve_dtype
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
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(out_dir="runs/rm", lr=1e-4))


@dataclass
class RMResult:
    accuracy: float  # held-out pair accuracy
    margin: float  # mean r_chosen - r_rejected on held-out pairs
    n_eval: int
    train: TrainResult
    path: Path  # the model to pass as reward.model_path


def build_reward_model(name_or_path: str | Path, pad_token_id: int, dtype: str = "float32", seed: int = 0) -> PreTrainedModel:
    """A one-label sequence classifier on the checkpoint's backbone; the head is seeded."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    with quiet_load_report():  # the head is new and the LM head unused, as intended: no warning
        model = AutoModelForSequenceClassification.from_pretrained(str(name_or_path), num_labels=1, dtype=resolve_dtype(dtype))
    # Pooling finds the last real token through pad_token_id; causal LM configs often leave it unset.
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
    width = int(batch["attention_mask"].sum(dim=1).max())  # trim padding beyond the longest row
    out = model(input_ids=batch["input_ids"][:, :width], attention_mask=batch["attention_mask"][:, :width], use_cache=False)
    return out.logits[:, 0].float()


def bt_loss_fn(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry loss of a stacked [chosen; rejected] batch."""
    chosen, rejected = rewards_of(model, batch).chunk(2)
    margin = chosen - rejected
    return -F.logsigmoid(margin).mean(), {"accuracy": (margin > 0).float().mean(), "margin": margin.detach().mean()}


@torch.no_grad()
def pair_accuracy(model: torch.nn.Module, pairs: Sequence[TokenizedPair], pad_id: int, batch_size: int = 32) -> tuple[float, float]:
    """(share of pairs with r_chosen > r_rejected, mean margin)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    margins = []
    for s in range(0, len(pairs), batch_size):
        batch = {k: v.to(device) for k, v in collate_pairs(pairs[s : s + batch_size], pad_id).items()}
        chosen, rejected = rewards_of(model, batch).chunk(2)
        margins.append((chosen - rejected).cpu())
    model.train(was_training)
    if not margins:
        return float("nan"), float("nan")
    m = torch.cat(margins)
    return float((m > 0).float().mean()), float(m.mean())


def split_held_out(pairs: list[TokenizedPair], fraction: float, seed: int) -> tuple[list[TokenizedPair], list[TokenizedPair]]:
    if not 0 < fraction < 1:
        raise ValueError(f"config key 'data.eval_fraction' must lie in (0, 1), got {fraction}")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(len(pairs) * fraction))
    return [pairs[i] for i in order[n_eval:]], [pairs[i] for i in order[:n_eval]]


def train_reward_model(config: RewardModelConfig, resume: bool = False, log=print) -> RMResult:
    """Train on `data.path`, report held-out pair accuracy, write `rm_metrics.json` beside `final/`."""
    if not config.model.name_or_path:
        raise ValueError("config key 'model.name_or_path' is required (the backbone, e.g. the SFT policy)")
    if not config.data.path:
        raise ValueError("config key 'data.path' is required (preference pairs)")
    if config.model.lora is not None:
        raise ValueError("config key 'model.lora': LoRA reward models are not supported; train the full model")
    tokenizer = load_tokenizer(config.model.name_or_path)
    trunc = dict(max_length=config.data.max_length, max_prompt_length=config.data.max_prompt_length,
                 truncation=config.data.truncation, skip_invalid=config.data.skip_invalid)

    def load_pairs(path: str) -> list[TokenizedPair]:
        loaded = load_preference_data(path, tokenizer=tokenizer, skip_invalid=config.data.skip_invalid)
        pairs, skipped = tokenize_preference(loaded.records, tokenizer, **trunc)
        if loaded.skipped + skipped:
            log(f"skipped {sum((loaded.skipped + skipped).values())} invalid rows of {path}")
        return pairs

    train_pairs = load_pairs(config.data.path)
    if config.data.eval_path:
        eval_pairs = load_pairs(config.data.eval_path)
    else:
        train_pairs, eval_pairs = split_held_out(train_pairs, config.data.eval_fraction, config.trainer.seed)

    model = build_reward_model(config.model.name_or_path, tokenizer.pad_token_id, config.model.dtype, config.trainer.seed)
    trainer = Trainer(model, config.trainer, n_examples=len(train_pairs), run_config=asdict(config), tokenizer=tokenizer)
    if resume:
        trainer.resume()
    pad = tokenizer.pad_token_id
    result = trainer.fit(
        [p.length for p in train_pairs], lambda idx: collate_pairs([train_pairs[i] for i in idx], pad), bt_loss_fn,
        evaluate=lambda step: dict(zip(("accuracy", "margin"), pair_accuracy(trainer.unwrapped, eval_pairs, pad), strict=True)),
    )
    trainer.end()
    last = result.history[-1] if result.history else {}
    if "eval/accuracy" in last:  # the Trainer evaluated the final step already
        accuracy, margin = last["eval/accuracy"], last["eval/margin"]
    else:  # resumed a run that had finished: nothing was trained or evaluated
        accuracy, margin = pair_accuracy(trainer.unwrapped, eval_pairs, pad)
    out = Path(config.trainer.out_dir)
    metrics = {"held_out_pair_accuracy": accuracy, "held_out_margin": margin, "n_eval_pairs": len(eval_pairs),
               "n_train_pairs": len(train_pairs), "steps": result.steps, "seconds": round(result.seconds, 2)}
    (out / "rm_metrics.json").write_text(json.dumps(metrics, indent=2))
    log(f"reward model: held-out pair accuracy {accuracy:.3f} on {len(eval_pairs)} pairs (margin {margin:.3f}); model in {out / 'final'}")
    return RMResult(accuracy, margin, len(eval_pairs), result, out / "final")


class RewardModel:
    """A trained reward model as a `Reward`: batched scoring of (prompt, response) texts."""

    def __init__(self, model: PreTrainedModel, tokenizer, batch_size: int = 64, name: str = "reward-model"):
        self.model, self.tokenizer, self.batch_size, self.name = model.eval(), tokenizer, batch_size, name

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu", batch_size: int = 64) -> RewardModel:
        path = Path(path)
        if (path / "final").is_dir() and not any(path.glob("*.safetensors")):
            path = path / "final"  # accept the run directory of `prefalign rm train` too
        if not (path / "config.json").exists():
            raise ValueError(f"reward.model_path {path} holds no model (train one with `prefalign rm train`)")
        tokenizer = load_tokenizer(path)
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(str(path)).to(resolve_device(device))
        model.config.pad_token_id = tokenizer.pad_token_id
        return cls(model, tokenizer, batch_size, name=f"rm:{path}")

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        records = [PromptCompletionRecord(p, r, "<rest>", i) for i, (p, r) in enumerate(zip(prompts, responses, strict=True))]
        rows, _ = tokenize_sft(records, self.tokenizer, max_length=None, max_prompt_length=None)
        device = next(self.model.parameters()).device
        out: list[float] = []
        for s in range(0, len(rows), self.batch_size):
            chunk = rows[s : s + self.batch_size]
            batch = collate_prompt_response([e.prompt_ids for e in chunk], [e.completion_ids for e in chunk], self.tokenizer.pad_token_id)
            out += rewards_of(self.model, {k: v.to(device) for k, v in batch.items()}).tolist()
        return out
