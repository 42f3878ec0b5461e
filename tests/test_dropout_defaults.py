"""Every training path that compares log-probabilities or rewards runs without dropout by default
(`trainer.disable_dropout`, as TRL's DPO, KTO and reward trainers): `prefalign train`,
`arm train`, `rm train` and ReST's Improve steps; `sft` keeps it. Checked on a tiny Llama whose
attention dropout is 0.3, by watching every module that runs in train mode."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_tokenizer, save_tiny_llama
from transformers import LlamaForCausalLM

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ["good", "great", "very good", "bad", "awful", "not good"]  # in the tiny vocabulary


@contextmanager
def active_dropout() -> Iterator[list[str]]:
    """Names of the module types that ran in train mode with a dropout probability above 0."""
    seen: list[str] = []

    def hook(module: torch.nn.Module, args: tuple) -> None:
        if not module.training:
            return
        p = module.p if isinstance(module, torch.nn.Dropout) else None
        p = getattr(module, "attention_dropout", p)
        if isinstance(p, float) and p > 0:
            seen.append(type(module).__name__)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def dropout_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dropout_llama")
    return save_tiny_llama(out, build_tiny_tokenizer(), attention_dropout=0.3)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("dropout_pairs") / "pairs.jsonl"
    rows = [
        {"prompt": "the movie was", "chosen": rng.choice(WORDS[:3]), "rejected": w}
        for w in WORDS[3:] * 6
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def overrides(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [f"model.name_or_path={model}", f"data.path={data}", f"trainer.out_dir={out}",
            "trainer.batch_size=4", "trainer.max_steps=2", "trainer.progress=false",
            "trainer.lr=1e-3", *extra]  # fmt: skip


@pytest.mark.parametrize("keep", [False, True])
def test_arm_training_disables_dropout_unless_told(tmp_path, dropout_model, pairs, keep):
    from prefalign.config import load_config
    from prefalign.genarm.arm import ArmConfig, train_arm

    extra = ["trainer.disable_dropout=false"] if keep else []
    config = load_config(ArmConfig, None, overrides(dropout_model, pairs, tmp_path, *extra))
    with active_dropout() as seen:
        train_arm(config, log=lambda *_: None)
    assert bool(seen) == keep, seen  # with the option off, the watch does see dropout


def test_reward_model_training_disables_dropout(tmp_path, dropout_model, pairs):
    from prefalign.config import load_config
    from prefalign.reward_models.train import RewardModelConfig, train_reward_model

    config = load_config(RewardModelConfig, None, overrides(dropout_model, pairs, tmp_path))
    with active_dropout() as seen:
        train_reward_model(config, log=lambda *_: None)
    assert seen == []


@pytest.mark.parametrize("loss", ["bc", "dpo"])
def test_rest_improve_disables_dropout_by_default(tmp_path, dropout_model, loss):
    from prefalign.modeling import load_tokenizer
    from prefalign.rest.grow import GrownSample
    from prefalign.rest.improve import ImproveSpec, build_data, improve

    tokenizer = load_tokenizer(dropout_model)
    pool = []
    for j, word in enumerate(WORDS * 2):
        prompt_ids = tokenizer("the movie was")["input_ids"]
        response_ids = [
            *tokenizer(word, add_special_tokens=False)["input_ids"],
            tokenizer.eos_token_id,
        ]
        reward = 1.0 if word in WORDS[:3] else 0.0
        pool.append(GrownSample(0, "base", 0, j, "the movie was", word, reward,
                                len(response_ids), True, prompt_ids, response_ids))  # fmt: skip
    kept = [i for i, s in enumerate(pool) if s.reward > 0]
    scores = [s.reward for s in pool]
    data = build_data(loss, pool, kept, scores, threshold=0.5)
    spec = ImproveSpec(loss=loss)
    trainer = replace(spec.trainer, out_dir=str(tmp_path), batch_size=2, max_steps=2,
                      progress=False)  # fmt: skip
    policy = LlamaForCausalLM.from_pretrained(dropout_model)
    with active_dropout() as seen:
        improve(policy, tokenizer, data, spec, trainer)
    assert seen == []


def test_sft_keeps_dropout(tmp_path, dropout_model):
    from prefalign.config import load_config
    from prefalign.training.sft import SFTConfig, run_sft

    data = tmp_path / "sft.jsonl"
    rows = [{"prompt": "the movie was", "completion": w} for w in WORDS * 2]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = load_config(SFTConfig, None, overrides(dropout_model, data, tmp_path / "run"))
    with active_dropout() as seen:
        run_sft(config)
    assert seen  # as TRL's SFT trainer: an SFT run regularizes with the model's own dropout
