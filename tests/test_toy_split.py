"""The toy worlds' held-out split: evaluation prompts never appear in training data."""

from __future__ import annotations

import random

import pytest

from prefalign.io import read_jsonl
from prefalign.tasks import Task, resolve_task
from prefalign.toy import corpus
from prefalign.toy.tasks import TOY_TASKS, toy_task
from prefalign.toy.world import ToyConfig
from prefalign.toy.world import corpus as world_corpus


def file_prompts(task: Task, name: str) -> set[str]:
    return {row["prompt"] for row in read_jsonl(task.files(name))}


def training_prompts(task: Task) -> set[str]:
    """Every prompt a method trains on: SFT texts, pairs, KTO data and the online prompts."""
    files = ("sft", "pairs", "unpaired")
    return set(task.prompts("train")).union(*(file_prompts(task, f) for f in files))


def held_out_prompts(task: Task) -> set[str]:
    return set(task.prompts("eval")) | file_prompts(task, "pairs_eval")


@pytest.mark.parametrize("task", ["sentiment", "arith"])
def test_default_worlds_hold_out_distinct_prompts_no_training_text_uses(task):
    config = ToyConfig.for_task(task)
    texts = world_corpus(config)
    assert len(set(texts.eval_prompts)) == len(texts.eval_prompts) == config.n_eval_prompts
    trained = {p for p, _ in texts.examples} | set(texts.train_prompts)
    assert not trained & set(texts.eval_prompts)
    assert set(texts.eval_pair_prompts) <= set(texts.eval_prompts)
    assert len(set(texts.train_prompts)) > 100  # the online methods still see many prompts


@pytest.mark.parametrize("name", sorted(TOY_TASKS))
def test_every_toy_task_trains_and_evaluates_on_disjoint_prompts(mini_worlds, name):
    world_name = TOY_TASKS[name][0]
    task = toy_task(name, mini_worlds[world_name])  # the registry's task, on the mini world
    assert resolve_task(f"toy:{name}").name == task.name
    held_out = held_out_prompts(task)
    assert held_out and len(training_prompts(task)) > len(held_out)
    assert not training_prompts(task) & held_out


def test_opening_split_is_disjoint_and_covers_the_grammar():
    train, held_out = corpus.split_openings(seed=0)
    assert not set(train) & set(held_out)
    assert len(train) + len(held_out) == len(corpus.all_openings()) > 1000
    assert corpus.split_openings(seed=1) != (train, held_out)


def test_enumerated_bigrams_are_exactly_those_the_grammar_samples():
    rng, seen = random.Random(0), set()
    for _ in range(100_000):
        words = "".join(corpus.review(rng)).split()
        seen.update(zip(words, words[1:], strict=False))
    assert seen == corpus.grammar_bigrams()


def test_coherence_is_the_share_of_grammatical_bigrams():
    from prefalign.toy.rewards import coherence, coherent_sentiment_reward

    assert coherence("the music of this film was", " very good and fun .") == 1.0
    # "good good good": of its bigrams (was good), (good good) x2, (good .) only two are grammatical
    assert coherence("the music of this film was", " good good good .") == pytest.approx(2 / 4)
    assert coherence("i loved the sequel", "") == 1.0
    assert coherent_sentiment_reward("the film of the show was", " great great great great .") < 0.5
