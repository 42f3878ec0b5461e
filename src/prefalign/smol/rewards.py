"""Gold rewards of the SmolLM2 tasks: VADER sentiment and brevity of a reply; exact sums."""

from __future__ import annotations

import re

from prefalign.tasks import TaskError
from prefalign.toy.rewards import sentiment_reward

__all__ = ["arith_correct", "arith_reward", "brevity_reward", "final_number", "sentiment_reward"]

BREVITY_WORDS = 60  # two sentences are 20-40 words; long, gushing replies score 0
_QUESTION = re.compile(r"What is (\d+) \+ (\d+)\?")
_NUMBER = re.compile(r"-?\d+")


def brevity_reward(prompt: str, completion: str, max_words: int = BREVITY_WORDS) -> float:
    """1 for an empty reply, falling linearly to 0 at `max_words` words: it conflicts with
    sentiment, which every extra glowing sentence raises."""
    return max(0.0, 1.0 - len(completion.split()) / max_words)


def expected_sum(prompt: str) -> int:
    """The answer to the last `What is a + b?` in a (chat-rendered) prompt."""
    questions = _QUESTION.findall(prompt)
    if not questions:
        raise TaskError(
            f"smol:arith: not an arithmetic prompt (no 'What is a + b?'): {prompt[-80:]!r}"
        )
    a, b = questions[-1]
    return int(a) + int(b)


def final_number(completion: str) -> int | None:
    """The reply's answer: its last integer (thousands separators ignored), None if it has none.

    SmolLM2 explains before it answers ("23 + 45 = 68. So the answer is 68."): the last number is
    the one it commits to.
    """
    numbers = _NUMBER.findall(completion.replace(",", ""))
    return int(numbers[-1]) if numbers else None


def arith_correct(prompt: str, completion: str) -> bool:
    return final_number(completion) == expected_sum(prompt)


def arith_reward(prompt: str, completion: str) -> float:
    """1 for the exact sum, else 0: the verifiable reward ReST-EM filters on."""
    return float(arith_correct(prompt, completion))
