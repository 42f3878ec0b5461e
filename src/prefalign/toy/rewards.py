"""Gold rewards of the toy tasks: VADER sentiment, coherence and brevity for reviews, checked sums
for arithmetic."""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache

from prefalign.tasks import TaskError

_ANSWER = re.compile(r"^\s*(\d+)\s*$")


@lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def sentiment_reward(prompt: str, completion: str) -> float:
    """VADER compound sentiment of the completion, in [-1, 1]: a scorer nobody here wrote."""
    return float(_vader().polarity_scores(completion)["compound"])


def coherence(prompt: str, completion: str) -> float:
    """Share of the reply's word bigrams (the first one joins it to the prompt's last word) that
    the toy grammar can produce; 1 for a reply with no words. Text that drifts out of the toy
    language scores low even where VADER likes it."""
    from prefalign.toy.corpus import grammar_bigrams

    words = prompt.split()[-1:] + completion.split()
    bigrams = list(zip(words, words[1:], strict=False))
    if not bigrams:
        return 1.0
    grammar = grammar_bigrams()
    return sum(b in grammar for b in bigrams) / len(bigrams)


def coherent_sentiment_reward(prompt: str, completion: str) -> float:
    """VADER sentiment times coherence: the gold of the over-optimisation experiment, where VADER
    alone labels the pairs and rewards degenerate positive text."""
    return sentiment_reward(prompt, completion) * coherence(prompt, completion)


def brevity_reward(prompt: str, completion: str, max_words: int = 24) -> float:
    """1 for an empty completion, falling linearly to 0 at `max_words` words; conflicts with
    sentiment, which grows with every extra positive word."""
    words = len(completion.split())
    return max(0.0, 1.0 - words / max_words)


def parse_sum(prompt: str) -> int:
    left, _, _ = prompt.partition("=")
    a, _, b = left.partition("+")
    try:
        return int(a) + int(b)
    except ValueError:
        raise TaskError(
            f"toy:arith: not an arithmetic prompt (no 'a+b='): {prompt[-80:]!r}"
        ) from None


def arith_reward(prompt: str, completion: str) -> float:
    """1 for the exact sum; otherwise partial credit per digit matching in place (aligned from
    the units digit), divided by the longer length; 0 for anything that is not a number."""
    match = _ANSWER.match(completion)
    if not match:
        return 0.0
    got, want = match.group(1), str(parse_sum(prompt))
    if got == want:
        return 1.0
    width = max(len(got), len(want))
    hits = sum(g == w for g, w in zip(got.rjust(width), want.rjust(width), strict=True))
    return 0.5 * hits / width  # partial credit stays below any exact answer


def arith_correct(prompt: str, completion: str) -> bool:
    match = _ANSWER.match(completion)
    return bool(match) and int(match.group(1)) == parse_sum(prompt)


RewardFn = Callable[[str, str], float]

GOLD_REWARDS: dict[str, RewardFn] = {
    "sentiment": sentiment_reward,
    "brevity": brevity_reward,
    "coherent_sentiment": coherent_sentiment_reward,
    "arith": arith_reward,
}


def gold_reward_fn(task: str) -> RewardFn:
    if task not in GOLD_REWARDS:
        raise ValueError(f"unknown task {task!r}, allowed: {', '.join(GOLD_REWARDS)}")
    return GOLD_REWARDS[task]
