"""Toy world pieces (gold rewards, tokenizer) and the KL estimator of evaluation."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from conftest import tiny_llama_for
from transformers import LlamaForCausalLM

from prefalign.evaluation.core import evaluate_policy, mean_and_se
from prefalign.toy.corpus import review
from prefalign.toy.rewards import arith_correct, arith_reward, brevity_reward, sentiment_reward
from prefalign.toy.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    rng = random.Random(0)
    return train_tokenizer(
        ["".join(review(rng)) for _ in range(500)] + ["47+8=55", "12+9=21"], vocab_size=400
    )


def test_vader_ranks_a_positive_review_above_a_negative_one():
    good = sentiment_reward("the movie was", " wonderful , i loved the brilliant cast .")
    bad = sentiment_reward("the movie was", " terrible , i hated the boring plot .")
    assert good > 0.5 > -0.5 > bad


def test_arith_reward_on_hand_made_examples():
    assert arith_reward("47+8=", "55") == 1.0 and arith_correct("47+8=", " 55 ")
    assert arith_reward("47+8=", "54") == pytest.approx(0.25)  # tens digit right: half of 0.5
    assert arith_reward("47+8=", "15") == pytest.approx(0.25)  # units digit right
    assert arith_reward("47+8=", "5") == pytest.approx(0.25)  # aligned from the units digit
    assert arith_reward("47+8=", "66") == 0.0
    assert arith_reward("47+8=", "fifty") == 0.0 and not arith_correct("47+8=", "fifty")


def test_brevity_falls_with_length():
    assert brevity_reward("", "") == 1.0
    assert brevity_reward("", " a b c") > brevity_reward("", " a b c d e f") > 0
    assert brevity_reward("", " w" * 40) == 0.0


def test_tokenizer_round_trips_text_and_splits_digits(tokenizer):
    for text in [
        "the movie was great , i loved the cast .",
        "417+285=702",
        "  odd   spacing\tand ünïcode",
    ]:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.convert_ids_to_tokens(tokenizer("417")["input_ids"]) == ["4", "1", "7"]


def tiny_model(tokenizer) -> LlamaForCausalLM:
    # LlamaConfig's default context (2048), as before the shared builder.
    return tiny_llama_for(tokenizer, num_key_value_heads=4, max_position_embeddings=2048).eval()


def test_kl_is_zero_for_the_same_policy_and_positive_after_perturbation(tokenizer):
    policy = tiny_model(tokenizer)
    prompts = ["the movie was", "this film is", "i watched"] * 4
    same = evaluate_policy(
        policy, tokenizer, "sentiment", prompts, reference=copy.deepcopy(policy), max_new_tokens=8
    )
    assert abs(same.kl) < 1e-4 and same.n == len(prompts)
    perturbed = copy.deepcopy(policy)
    with torch.no_grad():
        for p in perturbed.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    drifted = evaluate_policy(
        perturbed, tokenizer, "sentiment", prompts, reference=policy, max_new_tokens=8
    )
    assert drifted.kl > 0.05
    assert -1.0 <= drifted.gold_reward <= 1.0 and drifted.extra_rewards["brevity"] >= 0


def test_mean_and_standard_error():
    mean, se = mean_and_se([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and se == pytest.approx((5 / 3 / 4) ** 0.5)
