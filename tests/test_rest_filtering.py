"""ReST's filter: thresholds, normalization, per-prompt caps (pure functions, no models)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from prefalign.rest.filtering import (
    ThresholdSchedule,
    normalized_scores,
    percentiles,
    select,
    threshold_list,
)


def random_pool(
    seed: int, n_prompts: int = 12, per_prompt: int = 9
) -> tuple[list[float], list[int]]:
    rng = random.Random(seed)
    # Rounded rewards so that ties, including ties exactly at the threshold, occur.
    rewards = [round(rng.uniform(-1, 1), 1) for _ in range(n_prompts * per_prompt)]
    groups = [k // per_prompt for k in range(n_prompts * per_prompt)]
    return rewards, groups


@pytest.mark.parametrize("threshold", [-1.5, -0.3, 0.0, 0.2, 0.7, 1.0])
def test_threshold_keeps_exactly_the_samples_above_it(threshold):
    rewards, groups = random_pool(0)
    kept = select(rewards, groups, threshold)
    assert kept == [i for i, r in enumerate(rewards) if r > threshold]


def test_a_sample_exactly_at_the_threshold_is_not_kept():
    assert select([0.5, 0.5, 0.6, 0.4], [0, 1, 2, 3], 0.5) == [2]


@pytest.mark.parametrize("cap", [1, 2, 5])
def test_per_prompt_cap_holds_and_keeps_the_best(cap):
    rewards, groups = random_pool(1)
    kept = select(rewards, groups, threshold=-0.5, max_per_prompt=cap, seed=3)
    per_prompt = Counter(groups[i] for i in kept)
    for g in set(groups):
        passing = sorted(
            (rewards[i] for i in range(len(rewards)) if groups[i] == g and rewards[i] > -0.5),
            reverse=True,
        )
        assert per_prompt[g] == min(cap, len(passing)), g
        mine = sorted((rewards[i] for i in kept if groups[i] == g), reverse=True)
        assert mine == passing[:cap]  # the best passers, not any passers
    assert all(rewards[i] > -0.5 for i in kept)


def test_cap_breaks_ties_by_seed_and_dedup_counts_identical_responses_once():
    rewards, groups = [1.0] * 6, [0] * 6
    assert len(select(rewards, groups, 0.0, max_per_prompt=2, seed=0)) == 2
    picks = {tuple(select(rewards, groups, 0.0, max_per_prompt=2, seed=s)) for s in range(20)}
    assert len(picks) > 1  # ties are broken at random, not always by position
    keys = ["a", "a", "a", "b", "b", "c"]
    kept = select(rewards, groups, 0.0, dedup_keys=keys)
    assert sorted(keys[i] for i in kept) == ["a", "b", "c"]


def test_percentiles_are_mid_ranks_and_the_lowest_value_scores_zero():
    assert percentiles([3.0, 1.0, 2.0]) == [1.0, 0.0, 0.5]
    # Ties share the mean rank of their block, except the block at the minimum: it beats no one.
    assert percentiles([0.0, 1.0, 1.0, 0.0, 1.0]) == [0.0, 0.75, 0.75, 0.0, 0.75]
    assert percentiles([2.0, 2.0, 2.0]) == [0.0, 0.0, 0.0]
    assert percentiles([7.0]) == [0.0]


def test_ties_do_not_make_failures_pass_per_prompt():
    """A prompt whose samples all failed alike keeps none of them (they scored 0.5 each and
    passed a threshold of 0.4); a prompt's tied successes above its failures still pass."""
    rewards = [0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    groups = [0, 0, 0, 0, 1, 1, 1, 1]
    scores = normalized_scores(rewards, groups, "per_prompt_percentile")
    assert select(scores, groups, 0.4) == [5, 6, 7]


def test_a_prompt_with_nothing_above_the_absolute_floor_keeps_nothing():
    rewards = [0.1, 0.2, 0.3, 0.6, 0.7, 0.9]  # prompt 0 failed everywhere (floor 0.5)
    groups = [0, 0, 0, 1, 1, 1]
    scores = normalized_scores(rewards, groups, "per_prompt_percentile")
    assert select(scores, groups, 0.4) == [1, 2, 4, 5]  # percentiles alone keep prompt 0's best
    assert select(scores, groups, 0.4, rewards=rewards, min_reward=0.5) == [4, 5]
    # The floor holds whatever the normalization: a raw reward at the floor is not above it.
    assert select(rewards, groups, 0.0, rewards=rewards, min_reward=0.6) == [4, 5]
    with pytest.raises(ValueError, match="min_reward"):
        select(scores, groups, 0.4, min_reward=0.5)  # the floor needs the raw rewards


def test_per_prompt_percentile_ranks_within_each_prompt():
    rewards = [0.1, 0.2, 0.3, 5.0, 6.0, 7.0]
    groups = [0, 0, 0, 1, 1, 1]
    assert normalized_scores(rewards, groups, "per_prompt_percentile") == [
        0.0,
        0.5,
        1.0,
        0.0,
        0.5,
        1.0,
    ]
    assert normalized_scores(rewards, groups, "global_percentile") == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert normalized_scores(rewards, groups, "none") == rewards
    scaled = [0.0, 0.1 / 6.9, 0.2 / 6.9, 4.9 / 6.9, 5.9 / 6.9, 1.0]
    assert normalized_scores(rewards, groups, "min_max") == pytest.approx(scaled)
    # On per-prompt percentiles a hard prompt's best sample is kept although an easy one's worst
    # beats it.
    kept = select(normalized_scores(rewards, groups, "per_prompt_percentile"), groups, 0.7)
    assert kept == [2, 5]


def test_threshold_schedules():
    assert threshold_list(3, [0.0, 0.5, 0.9], None) == [0.0, 0.5, 0.9]
    assert threshold_list(5, None, ThresholdSchedule(start=0.0, end=0.8)) == pytest.approx(
        [0.0, 0.2, 0.4, 0.6, 0.8]
    )
    assert threshold_list(4, None, ThresholdSchedule(start=0.2, end=0.6, steps=3)) == pytest.approx(
        [0.2, 0.4, 0.6, 0.6]
    )
    assert threshold_list(1, None, ThresholdSchedule(start=0.3, end=0.7)) == [0.3]
    with pytest.raises(ValueError, match="one per step"):
        threshold_list(3, [0.0, 0.5], None)
    with pytest.raises(ValueError, match="must not fall"):
        threshold_list(2, [0.5, 0.1], None)
