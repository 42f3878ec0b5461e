"""Prompts of the SmolLM2 tasks as user messages (the world renders them with the chat template).

Sentiment follows the controlled-sentiment experiment of Rafailov et al. (2023, DPO, section 6.1),
which continued IMDb review prefixes with GPT-2: here an instruction model is asked for a short
review of a film drawn from a grammar of titles, genres and openings. Train and evaluation
prompts come from disjoint title sets, so no evaluation film is seen in training.
"""

from __future__ import annotations

import random

from prefalign.config import ConfigError

ADJECTIVES = (
    "Silent Crimson Hollow Last Distant Broken Golden Hidden Frozen Burning Quiet Endless Lost "
    "Velvet Iron Paper Midnight Scarlet Wandering Forgotten Northern Electric Shallow Lonely"
).split()
NOUNS = (
    "Harbor Garden Mirror Station Kingdom River Letter Orchard Signal Lantern Island Machine "
    "Winter Bridge Empire Canyon Voyage Archive Circus Meadow Citadel Tide Engine Parade"
).split()
GENRES = (
    "comedy",
    "thriller",
    "drama",
    "science-fiction film",
    "horror film",
    "documentary",
    "romance",
    "western",
    "animated film",
    "war film",
    "mystery",
    "musical",
)
OPENINGS = (
    'Write a one-sentence review of the {genre} "{title}".',
    'In one sentence, review the {genre} "{title}".',
    'Give a short review (one sentence) of the {genre} "{title}".',
    'Briefly review the {genre} "{title}" in one sentence.',
    'You just watched the {genre} "{title}". Write a one-sentence review.',
)


def titles() -> list[str]:
    return [f"The {adjective} {noun}" for adjective in ADJECTIVES for noun in NOUNS]


def split_titles(seed: int, n_eval: int) -> tuple[list[str], list[str]]:
    """(train titles, evaluation titles), disjoint."""
    pool = titles()
    random.Random(seed).shuffle(pool)
    return pool[n_eval:], pool[:n_eval]


def review_requests(titles_: list[str], n: int, seed: int) -> list[str]:
    """`n` distinct review requests (user messages) about the given titles."""
    rng = random.Random(seed)
    combos = [(t, g, o) for t in titles_ for g in GENRES for o in OPENINGS]
    picked = rng.sample(combos, min(n, len(combos)))
    return [opening.format(genre=genre, title=title) for title, genre, opening in picked]


ARITH_QUESTION = "What is {a} + {b}?"


def arith_problems(low: int, high: int, n_train: int, n_eval: int, seed: int):
    """Disjoint (train, evaluation) lists of operand pairs with both operands in [low, high]."""
    pairs = [(a, b) for a in range(low, high + 1) for b in range(low, high + 1)]
    rng = random.Random(seed)
    rng.shuffle(pairs)
    if n_train + n_eval > len(pairs):
        raise ConfigError(
            f"config keys 'arith_low', 'arith_high': only {len(pairs)} problems with operands in "
            f"[{low}, {high}], {n_train + n_eval} needed (n_train_prompts + n_eval_prompts)"
        )
    return pairs[n_eval : n_eval + n_train], pairs[:n_eval]


def arith_request(a: int, b: int) -> str:
    return ARITH_QUESTION.format(a=a, b=b)
