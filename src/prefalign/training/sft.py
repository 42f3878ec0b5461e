"""Supervised fine-tuning on prompt/completion data (the toy build uses it too)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from prefalign.data.tokenize import TruncationSettings
from prefalign.logprobs import collate_prompt_response, nll_loss
from prefalign.manifest import write_manifest
from prefalign.modeling import ModelSpec, check_device, load_model, load_tokenizer
from prefalign.training.loop import Trainer, TrainerConfig, TrainResult, seed_everything


@dataclass
class SFTData(TruncationSettings):
    path: str = ""
    skip_invalid: bool = False
    loss_on_prompt: bool = False  # True trains on every token (plain language-model pretraining)


@dataclass
class SFTConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    data: SFTData = field(default_factory=SFTData)
    trainer: TrainerConfig = field(
        default_factory=lambda: TrainerConfig(out_dir="runs/sft", lr=1e-4)
    )


def train_sft(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[list[int]],
    responses: Sequence[list[int]],
    config: TrainerConfig,
    loss_on_prompt: bool = False,
    run_config: dict | None = None,
    resume: bool = False,
    device: str = "auto",
) -> TrainResult:
    """Minimise the NLL of responses given prompts (of every token if `loss_on_prompt`) on
    `device` (`model.device`)."""
    if loss_on_prompt:
        prompts, responses = (
            [[] for _ in prompts],
            [p + r for p, r in zip(prompts, responses, strict=True)],
        )
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]

    def collate(indices: list[int]) -> dict:
        return collate_prompt_response(
            [prompts[i] for i in indices], [responses[i] for i in indices], tokenizer.pad_token_id
        )

    def loss_fn(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        loss = nll_loss(model, batch)
        return loss, {}

    trainer = Trainer(
        model, config, lengths, run_config=run_config, tokenizer=tokenizer, device=device
    )
    if resume:
        trainer.resume()
    result = trainer.fit(collate, loss_fn)
    trainer.end()
    return result


def run_sft(config: SFTConfig, resume: bool = False) -> TrainResult:
    """`prefalign sft`: load model, tokenizer and data from the config and train."""
    from prefalign.data import load_sft_data, tokenize_sft

    check_device(config.model.device)  # before anything loads
    write_manifest(config.trainer.out_dir, "sft")
    tokenizer = load_tokenizer(config.model.name_or_path)
    seed_everything(config.trainer.seed)  # the seed decides a LoRA adapter's init
    model = load_model(
        config.model.name_or_path,
        dtype=config.model.dtype,
        device="cpu",  # accelerate places it
        lora=config.model.lora,
        gradient_checkpointing=config.model.gradient_checkpointing,
        lean_activations=config.model.lean_activations == "auto",
    )
    loaded = load_sft_data(
        config.data.path, tokenizer=tokenizer, skip_invalid=config.data.skip_invalid
    )
    examples, skipped = tokenize_sft(
        loaded.records,
        tokenizer,
        **config.data.limits(),
        skip_invalid=config.data.skip_invalid,
    )
    total_skipped = sum(loaded.skipped.values()) + sum(skipped.values())
    if total_skipped:
        reasons = dict(loaded.skipped + skipped)
        print(f"skipped {total_skipped} invalid rows: {reasons}")
    return train_sft(
        model,
        tokenizer,
        [e.prompt_ids for e in examples],
        [e.completion_ids for e in examples],
        config.trainer,
        loss_on_prompt=config.data.loss_on_prompt,
        run_config=asdict(config),
        resume=resume,
        device=config.model.device,
    )
