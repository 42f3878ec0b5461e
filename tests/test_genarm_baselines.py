"""ARGS and best-of-N on tiny random models: the cached candidate rewards equal full-sequence
rewards, and the selection rules do what they claim."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import build_tiny_tokenizer, tiny_llama_config
from transformers import LlamaForCausalLM, LlamaForSequenceClassification

from prefalign.genarm.baselines import (
    ArgsRewardTracker,
    args_generate,
    best_of_n,
    best_of_n_kl_bound,
)
from prefalign.generation import SamplingParams, encode_prompt, generate, pad_left
from prefalign.logprobs import collate_prompt_response
from prefalign.modeling import ModelSpec
from prefalign.reward_models import SequenceRewardModel, load_reward_model
from prefalign.reward_models.train import RewardModelConfig, RMData, rewards_of, train_reward_model
from prefalign.training.loop import TrainerConfig

PROMPTS = ["the movie was", "i", "what is the answer ?", "two plus two equals"]
GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0, batch_size=4)


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


@pytest.fixture(scope="module")
def rm():
    torch.manual_seed(1)
    return SequenceRewardModel(
        LlamaForSequenceClassification(tiny_llama_config(num_labels=1))
    ).eval()


def test_cached_candidate_rewards_equal_full_sequence_rewards(rm, tok):
    prompt_ids = [encode_prompt(tok, p) for p in PROMPTS]
    ids, mask = pad_left(prompt_ids, tok.pad_token_id, torch.device("cpu"))
    tracker = ArgsRewardTracker(rm).start(ids, mask)
    prefix = [list(p) for p in prompt_ids]
    for step in range(3):  # the prefix grows by a chosen candidate each step
        candidates = torch.randint(
            4, 60, (len(PROMPTS), 5), generator=torch.Generator().manual_seed(step)
        )
        cached = tracker.candidate_rewards(candidates)
        full = rm.score(
            [p for p in prefix for _ in range(5)],
            [[int(c)] for row in candidates for c in row],
            tok.pad_token_id,
        ).reshape(len(PROMPTS), 5)
        torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)
        chosen = candidates[torch.arange(len(PROMPTS)), torch.tensor([step % 5, 4, 0, 2])]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        tracker.step(chosen, mask)
        prefix = [p + [int(c)] for p, c in zip(prefix, chosen, strict=True)]


def test_args_with_one_candidate_is_base_greedy(base, rm, tok):
    assert [
        g.response_ids for g in args_generate(base, rm, tok, PROMPTS, GREEDY, k=1, weight=100.0)
    ] == [g.response_ids for g in generate(base, tok, PROMPTS, GREEDY)]


def test_args_picks_the_best_rescored_candidate(base, rm, tok):
    """Greedy ARGS's first token maximizes log pi_base(c) + w * r(x c) over the base's top k."""
    k, weight = 6, 5.0
    out = args_generate(
        base,
        rm,
        tok,
        PROMPTS,
        SamplingParams(max_new_tokens=1, temperature=0.0),
        k=k,
        weight=weight,
    )
    for prompt, g in zip(PROMPTS, out, strict=True):
        ids = encode_prompt(tok, prompt)
        with torch.no_grad():
            logps = torch.log_softmax(base(torch.tensor([ids])).logits[0, -1], -1)
        top = logps.topk(k)
        rewards = rm.score([ids] * k, [[int(c)] for c in top.indices], tok.pad_token_id)
        assert g.response_ids[0] == int(top.indices[(top.values + weight * rewards).argmax()])
    # The reward model must matter at this weight, or the check above proves nothing.
    assert [g.response_ids[:1] for g in out] != [
        g.response_ids[:1] for g in generate(base, tok, PROMPTS, GREEDY)
    ]


def test_best_of_n_keeps_the_highest_reward(base, tok, rm):
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=5, batch_size=16)
    samples = generate(base, tok, [p for p in PROMPTS for _ in range(4)], params)
    chosen, rewards = best_of_n(
        base, tok, PROMPTS, params, n=4, reward_fn=lambda p, text: -len(text)
    )
    for i, g in enumerate(chosen):
        group = samples[4 * i : 4 * i + 4]
        assert len(g.text) == min(len(s.text) for s in group) and rewards[i] == -len(g.text)
    # With the reward model: its scores of the chosen samples are the group maxima.
    chosen, rewards = best_of_n(base, tok, PROMPTS, params, n=4, rm=rm)
    scores = rm.score(
        [s.prompt_ids for s in samples], [s.response_ids for s in samples], tok.pad_token_id
    ).reshape(4, 4)
    torch.testing.assert_close(torch.tensor(rewards), scores.max(dim=1).values)
    with pytest.raises(ValueError, match="exactly one"):
        best_of_n(base, tok, PROMPTS, params, n=2)
    assert best_of_n_kl_bound(1) == 0 and best_of_n_kl_bound(4) == pytest.approx(
        1.386294 - 0.75, abs=1e-6
    )


def test_reward_model_from_rm_train_reads_the_same_rewards(tmp_path, tok):
    """A reward model trained by `prefalign rm train` scores sequences the same through the
    per-prefix reader ARGS uses, and what it learned (good above bad) survives the reading."""
    rng = random.Random(0)
    subjects = "the movie|the film|the story|the book|it".split("|")
    rows = [
        {
            "prompt": rng.choice(subjects) + " was",
            "chosen": f" very good {w} .",
            "rejected": f" very bad {w} .",
        }
        for w in rng.choices(["and great", "not", "ok", "really", "so"], k=64)
    ]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(tmp_path / "init")
    tok.save_pretrained(tmp_path / "init")
    config = RewardModelConfig(
        model=ModelSpec(name_or_path=str(tmp_path / "init")),
        data=RMData(path=str(tmp_path / "pairs.jsonl"), eval_path=str(tmp_path / "pairs.jsonl")),
        trainer=TrainerConfig(
            out_dir=str(tmp_path / "rm"),
            batch_size=16,
            max_steps=15,
            lr=1e-2,
            schedule="constant",
            progress=False,
        ),
    )
    result = train_reward_model(config, log=lambda *_: None)
    assert result.accuracy > 0.9
    rm = load_reward_model(tmp_path / "rm")
    prompts = [tok("it was")["input_ids"]] * 2
    responses = [
        tok(" very good .")["input_ids"] + [tok.eos_token_id],
        tok(" very bad .")["input_ids"] + [tok.eos_token_id],
    ]
    good, bad = rm.score(prompts, responses, tok.pad_token_id)
    assert good > bad
    batch = collate_prompt_response(prompts, responses, tok.pad_token_id)
    with torch.no_grad():
        torch.testing.assert_close(torch.stack([good, bad]), rewards_of(rm.classifier, batch))
