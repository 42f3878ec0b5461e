"""ReST's Improve step: how each loss builds its training set, and that training on it lowers that
same loss on a fixed set (tiny random Llama, word-level tokenizer)."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from transformers import LlamaForCausalLM

from prefalign.reference import ReferenceSpec, make_reference
from prefalign.rest.filtering import normalized_scores, select
from prefalign.rest.grow import GrownSample
from prefalign.rest.improve import (
    ImproveSpec,
    build_data,
    improve,
    make_loss_fn,
    objective_value,
    resolve_loss,
    reward_weights,
)
from prefalign.training.loop import TrainerConfig

PROMPTS = ["the movie was", "the book is", "i think the story", "it was a"]
GOOD = ["good", "great", "very good", "really great", "good and great"]
BAD = ["bad", "awful", "very bad", "really awful", "bad or awful"]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


def make_pool(tokenizer, per_prompt: int = 6, seed: int = 0) -> list[GrownSample]:
    """Grown samples whose reward counts good words minus bad words."""
    rng = random.Random(seed)
    pool = []
    for k, prompt in enumerate(PROMPTS):
        for j in range(per_prompt):
            text = rng.choice(GOOD if j % 2 == 0 else BAD)
            reward = sum(w in ("good", "great") for w in text.split()) - sum(
                w in ("bad", "awful") for w in text.split()
            )
            prompt_ids = tokenizer(prompt)["input_ids"]
            response_ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [
                tokenizer.eos_token_id
            ]
            pool.append(
                GrownSample(
                    0,
                    "base",
                    k,
                    j,
                    prompt,
                    text,
                    float(reward),
                    len(response_ids),
                    True,
                    prompt_ids,
                    response_ids,
                )
            )
    return pool


class NoReduce:
    """Stands in for the Accelerator that KTO's loss averages its KL point across processes with."""

    def reduce(self, tensor, reduction="mean"):
        return tensor


@pytest.fixture
def policy(tiny_llama_dir):
    return LlamaForCausalLM.from_pretrained(tiny_llama_dir)


def kept_set(pool, threshold=0.0, cap=0):
    groups = [s.prompt_index for s in pool]
    scores = normalized_scores([s.reward for s in pool], groups, "none")
    return select(scores, groups, threshold, cap), scores


@pytest.mark.parametrize(
    "loss,params,mode",
    [
        ("bc", {}, "none"),
        ("reward_weighted", {}, "none"),
        ("dpo", {"beta": 0.5}, "frozen"),
        ("ipo", {"beta": 0.5}, "soft"),
        ("kto", {"beta": 0.5}, "frozen"),
    ],
)
def test_each_improve_loss_lowers_its_own_objective_on_a_fixed_set(
    policy, tiny_tokenizer, tmp_path, loss, params, mode
):
    pool = make_pool(tiny_tokenizer)
    kept, scores = kept_set(pool)
    data = build_data(loss, pool, kept, scores, threshold=0.0, seed=0)
    assert len(data) >= 8
    # The objective is measured against the policy the step starts from (a frozen copy).
    reference = make_reference(copy.deepcopy(policy), ReferenceSpec(mode="frozen"))
    measure = make_loss_fn(resolve_loss(loss, params), reference, NoReduce())
    pad = tiny_tokenizer.pad_token_id
    torch.manual_seed(0)
    before = objective_value(policy, data, measure, pad, batch_size=8)
    spec = ImproveSpec(
        loss=loss,
        objective_params=params,
        reference=ReferenceSpec(mode="frozen" if mode == "none" else mode),
    )
    config = TrainerConfig(
        out_dir=str(tmp_path / loss),
        batch_size=4,
        max_steps=8,
        lr=3e-3,
        progress=False,
        log_every=1,
    )
    result = improve(policy, tiny_tokenizer, data, spec, config)
    assert result.steps == 8
    after = objective_value(policy, data, measure, pad, batch_size=8)
    assert after < before - 0.05, (before, after)
    assert (tmp_path / loss / "final" / "model.safetensors").exists()


def test_nll_losses_train_on_the_kept_responses_with_reward_weights(tiny_tokenizer):
    pool = make_pool(tiny_tokenizer)
    kept, scores = kept_set(pool, threshold=0.5)
    bc = build_data("bc", pool, kept, scores, 0.5)
    assert bc.kind == "sequences" and bc.examples == [
        (pool[i].prompt_ids, pool[i].response_ids) for i in kept
    ]
    assert bc.weights == [1.0] * len(kept)
    rw = build_data("reward_weighted", pool, kept, scores, 0.5)
    assert sum(rw.weights) / len(rw.weights) == pytest.approx(1.0)
    by_reward = sorted(zip((pool[i].reward for i in kept), rw.weights, strict=True))
    # more reward, more weight
    assert all(w1 <= w2 for (_, w1), (_, w2) in zip(by_reward, by_reward[1:], strict=False))
    assert reward_weights([0.0, 1.0, 3.0], [1, 2]) == pytest.approx([0.5, 1.5])
    batch = rw.collate([0, 1], tiny_tokenizer.pad_token_id)
    assert batch["weights"].tolist() == pytest.approx(rw.weights[:2])


def test_pairs_put_a_kept_sample_over_a_worse_one_of_the_same_prompt(tiny_tokenizer):
    pool = make_pool(tiny_tokenizer)
    kept, scores = kept_set(pool, threshold=0.0)
    data = build_data("dpo", pool, kept, scores, 0.0, seed=1)
    assert data.kind == "pairs" and 0 < len(data) <= len(kept)
    by_ids = {(tuple(s.prompt_ids), tuple(s.response_ids)): s for s in pool}
    for pair in data.examples:
        better, worse = (
            by_ids[(tuple(pair.prompt_ids), tuple(pair.chosen_ids))],
            by_ids[(tuple(pair.prompt_ids), tuple(pair.rejected_ids))],
        )
        assert better.prompt_index == worse.prompt_index and better.reward > worse.reward
    # A prompt whose samples all tie has no worse partner: no pair, rather than a fake one.
    flat = [GrownSample(0, "base", 0, j, "p", "x", 1.0, 2, True, [1], [5 + j, 2]) for j in range(3)]
    assert len(build_data("dpo", flat, [0, 1, 2], [1.0] * 3, 0.0)) == 0


def test_kto_labels_kept_samples_desirable_and_the_rest_undesirable(tiny_tokenizer):
    pool = make_pool(tiny_tokenizer)
    kept, scores = kept_set(pool, threshold=0.0, cap=2)
    data = build_data("kto", pool, kept, scores, 0.0, max_per_prompt=2)
    labels = [e.label for e in data.examples]
    assert labels.count(True) == len(kept) and labels.count(False) == 2 * len(PROMPTS)
    # Below the raw-reward floor a sample failed, whatever its score: it is undesirable too.
    floor = sorted(s.reward for s in pool)[len(pool) // 2]
    rewards, groups = [s.reward for s in pool], [s.prompt_index for s in pool]
    kept = select(scores, groups, -1e9, rewards=rewards, min_reward=floor)
    data = build_data("kto", pool, kept, scores, -1e9, min_reward=floor)
    failed = sum(s.reward <= floor for s in pool)
    assert [e.label for e in data.examples].count(False) == failed > 0


def test_unknown_loss_is_a_one_line_error_naming_the_choices():
    with pytest.raises(ValueError, match="improve.loss.*bc, reward_weighted.*dpo"):
        build_data("dpoo", [], [], [], 0.0)
