"""ReST's Grow step and its pluggable rewards (tiny random Llama, word-level tokenizer)."""

from __future__ import annotations

import json

import pytest
from transformers import LlamaForCausalLM

from prefalign.rest.grow import (
    GrowSpec,
    grow,
    load_prompts,
    read_samples,
    reward_summary,
    write_samples,
)
from prefalign.rest.rewards import FunctionReward, RewardSpec, load_function, load_reward
from prefalign.toy.rewards import arith_reward

PROMPTS = ["the movie was", "i think", "what is the answer ?"]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


def count_good(prompt: str, completion: str) -> float:
    return float(completion.split().count("good"))


@pytest.fixture(scope="module")
def policy(tiny_llama_dir):
    return LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval()


def test_grow_samples_n_per_prompt_and_stores_everything_to_inspect(
    policy, tiny_tokenizer, tmp_path
):
    spec = GrowSpec(samples_per_prompt=4, max_new_tokens=5, seed=3, batch_size=5)
    samples, timings = grow(
        policy,
        tiny_tokenizer,
        PROMPTS,
        spec,
        FunctionReward(count_good, "good"),
        2,
        "g1.i0",
        gold=FunctionReward(lambda p, c: -1.0, "gold"),
    )
    assert len(samples) == 12 and timings.sample_seconds > 0
    for k, s in enumerate(samples):
        assert (s.prompt_index, s.sample_index, s.prompt) == (k // 4, k % 4, PROMPTS[k // 4])
        assert (s.grow_step, s.policy, s.gold_reward) == (2, "g1.i0", -1.0)
        assert s.reward == count_good(s.prompt, s.response)
        assert s.n_tokens == len(s.response_ids) <= 5
        assert s.finished == (s.response_ids[-1] == tiny_tokenizer.eos_token_id)
        assert tiny_tokenizer.decode(s.response_ids, skip_special_tokens=True) == s.response
    path = tmp_path / "grown" / "grow_002.jsonl"
    write_samples(path, samples)
    assert read_samples(path) == samples
    row = json.loads(path.read_text().splitlines()[0])
    assert {"prompt", "response", "reward", "n_tokens", "grow_step", "policy"} <= set(row)
    assert not list(path.parent.glob("*.tmp"))  # written atomically


def test_grow_is_seeded_per_step(policy, tiny_tokenizer):
    spec = GrowSpec(samples_per_prompt=3, max_new_tokens=6, seed=0)
    reward = FunctionReward(count_good, "good")

    def responses(step: int) -> list[list[int]]:
        return [
            s.response_ids
            for s in grow(policy, tiny_tokenizer, PROMPTS, spec, reward, step, "base")[0]
        ]

    assert responses(0) == responses(0)
    assert responses(0) != responses(1)  # a new Grow step draws new samples


def test_reward_summary():
    d = reward_summary([float(x) for x in range(10)])
    assert (d["mean"], d["min"], d["max"], d["p10"], d["p50"], d["p90"]) == (
        4.5,
        0.0,
        9.0,
        1.0,
        5.0,
        9.0,
    )


def test_rewards_are_pluggable(tmp_path):
    assert load_reward(RewardSpec(kind="gold", task="arith")).score(["12+5="], ["17"]) == [1.0]
    module_fn = load_reward(
        RewardSpec(kind="function", function="prefalign.toy.rewards:arith_reward")
    )
    assert module_fn.score(["12+5=", "12+5="], ["17", "x"]) == [1.0, 0.0]
    code = tmp_path / "my_reward.py"
    code.write_text("def shout(prompt, completion):\n    return completion.count('!')\n")
    assert load_reward(RewardSpec(kind="function", function=f"{code}:shout")).score(
        ["a"], ["hi!!"]
    ) == [2.0]
    assert load_function("prefalign.toy.rewards:arith_reward") is arith_reward


@pytest.mark.parametrize(
    "spec,match",
    [
        (RewardSpec(kind="gold", task="poetry"), "reward.task"),
        (RewardSpec(kind="function"), "reward.function"),
        (RewardSpec(kind="function", function="no_colon"), "module:function"),
        (RewardSpec(kind="function", function="prefalign.toy.rewards:nope"), "no callable 'nope'"),
        (RewardSpec(kind="function", function="/nonexistent/r.py:f"), "file not found"),
    ],
)
def test_bad_reward_specs_are_one_line_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        load_reward(spec)


def test_load_prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n{"prompt": "c"}\n')
    assert load_prompts(str(path)) == ["a", "b", "c"] and load_prompts(str(path), 2) == ["a", "b"]
    with pytest.raises(ValueError, match="grow.prompts"):
        load_prompts("")
    path.write_text('{"text": "a"}\n')
    with pytest.raises(ValueError, match=":1: expected"):
        load_prompts(str(path))
