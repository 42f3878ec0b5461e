"""Corpus generators of the toy world: short movie reviews from a grammar, and noisy arithmetic.

Reviews mix positive, negative and neutral clauses in equal measure, so the supervised policy
is neutral on average and alignment towards positive sentiment has room to move. Arithmetic
answers come from a noisy teacher, so the supervised policy is right only part of the time.

A review is its opening (the prompt: "the music of this film was", "i loved the sequel", ...)
and a continuation. The openings are enumerated (1,408 of them) so that training and evaluation
can use disjoint sets of prompts (`split_openings`). The grammar is written as templates of
slots, so the same tables generate text and enumerate every word bigram the grammar can produce
(`grammar_bigrams`), which measures how far a policy's text has left the toy language.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from functools import lru_cache

POSITIVE = (
    "great wonderful amazing excellent brilliant lovely beautiful superb fantastic delightful "
    "charming "
    "enjoyable good fun happy perfect stunning touching hilarious clever sweet warm fresh exciting "
    "inspiring memorable impressive gorgeous pleasant brave elegant graceful magnificent "
    "outstanding "
    "splendid terrific joyful thoughtful refreshing glorious"
).split()
NEGATIVE = (
    "terrible awful boring horrible dull bad poor disappointing stupid ugly weak annoying painful "
    "dreadful lousy pathetic miserable sad tedious bland mediocre awkward clumsy silly ridiculous "
    "cheap lame messy confusing depressing frustrating unpleasant worthless horrendous nasty "
    "hopeless irritating tiresome shallow"
).split()
NEUTRAL = (
    "long short quiet loud dark bright simple strange old new plain slow fast familiar modern "
    "classic quick steady ordinary typical usual calm busy"
).split()
SUBJECTS = (
    "the movie|the film|the story|the plot|the acting|the cast|the music|the ending|the script|"
    "the dialogue|the director|the soundtrack|the camera work|the lead actor|the villain|the hero|"
    "the first half|the second act|the pacing|the humor|the costumes|the set|the editing"
).split("|")
FILMS = (
    "the movie|this film|the show|this movie|the new film|this series|the sequel|the remake|"
    "this documentary|the cartoon|this drama|the thriller|this comedy|the musical|the prequel|"
    "this anime"
).split("|")
INTENSIFIERS = ("", "", "", "very", "really", "quite", "so", "truly", "rather", "pretty")
VERBS_POS = "loved enjoyed liked adored admired recommend".split()
VERBS_NEG = "hated disliked regret avoided resented".split()
VERBS_NEU = "watched saw noticed remember finished".split()
BE = ("was", "is", "felt")
CONNECTORS = ("and", "but", ".", ",")
WORDS = {"pos": POSITIVE, "neg": NEGATIVE, "neu": NEUTRAL}
VERBS = {"pos": VERBS_POS, "neg": VERBS_NEG, "neu": VERBS_NEU}

Slot = tuple[str, ...]  # alternative phrases of one position; "" is the empty phrase
Template = tuple[Slot, ...]


def _slot(*phrases: str) -> Slot:
    return tuple(phrases)


def clause_templates(tone: str) -> tuple[Template, ...]:
    """The four clause forms of one tone."""
    words, verbs = tuple(WORDS[tone]), tuple(VERBS[tone])
    subjects, intens = tuple(SUBJECTS), INTENSIFIERS
    return (
        (subjects, _slot("was"), intens, words),
        (_slot("i"), verbs, subjects),
        (intens, words, _slot("and"), words),
        (words, _slot(","), subjects, _slot("felt"), words),
    )


# Openings: a film and a verb of being, a first-person verb, or a part of a film.
OPENING_TEMPLATES: tuple[Template, ...] = (
    (tuple(FILMS), BE),
    (_slot("i"), tuple(VERBS_POS + VERBS_NEG + VERBS_NEU), tuple(FILMS)),
    (tuple(SUBJECTS), _slot("of"), tuple(FILMS), BE),
)
# After a "... was" opening the review first says how it was.
AFTER_BE: Template = (INTENSIFIERS, tuple(POSITIVE + NEGATIVE + NEUTRAL))


def _fill(rng: random.Random, template: Template) -> str:
    return " ".join(p for p in (rng.choice(slot) for slot in template) if p)


@lru_cache(maxsize=1)
def all_openings() -> tuple[str, ...]:
    """Every opening the grammar has, in a fixed order."""
    return tuple(
        " ".join(p for p in combo if p)
        for template in OPENING_TEMPLATES
        for combo in itertools.product(*template)
    )


def split_openings(seed: int, eval_share: float = 0.25) -> tuple[list[str], list[str]]:
    """(training openings, evaluation openings): a seeded disjoint split of all openings."""
    openings = list(all_openings())
    random.Random(seed).shuffle(openings)
    n_eval = round(len(openings) * eval_share)
    return sorted(openings[n_eval:]), sorted(openings[:n_eval])


def review_clause(rng: random.Random, tone: str) -> str:
    return _fill(rng, rng.choice(clause_templates(tone)))


def continuation(rng: random.Random, opening: str) -> str:
    """The rest of a review after its opening: how it was (after 'was'), up to two clauses of
    any tone, and a full stop ("i loved the sequel" may end there: " .")."""
    parts = [_fill(rng, AFTER_BE)] if opening.split()[-1] in BE else []
    for _ in range(rng.randint(0, 2)):
        parts += [rng.choice(CONNECTORS), review_clause(rng, rng.choice(tuple(WORDS)))]
    return " " + " ".join([*parts, "."])


def review(
    rng: random.Random, openings: tuple[str, ...] | list[str] | None = None
) -> tuple[str, str]:
    """(prompt, completion): an opening drawn from `openings` (all of them by default) and its
    continuation, which starts with a space."""
    opening = rng.choice(openings or all_openings())
    return opening, continuation(rng, opening)


def review_pairs(rng: random.Random, n: int) -> list[dict[str, str]]:
    """`n` preference pairs of two different continuations of one opening (which is chosen is
    arbitrary: data for timing and memory, not for learning a preference)."""
    pairs: list[dict[str, str]] = []
    while len(pairs) < n:
        prompt, good = review(rng)
        _, bad = review(rng)
        if good != bad:
            pairs.append({"prompt": prompt, "chosen": good, "rejected": bad})
    return pairs


def review_text(rng: random.Random) -> str:
    return "".join(review(rng))


def grammar_words() -> list[str]:
    """Every word a review can hold, sorted."""
    words = {w for phrase in (*all_openings(), *CONNECTORS, *INTENSIFIERS) for w in phrase.split()}
    for tone in WORDS:
        for template in clause_templates(tone):
            words |= {w for slot in template for phrase in slot for w in phrase.split()}
    return sorted(words)


def _extend(frontier: set[str], template: Template, bigrams: set[tuple[str, str]]) -> set[str]:
    """Add the bigrams of `template` following any word of `frontier`; return its last words."""
    for slot in template:
        after: set[str] = set()
        for phrase in slot:
            words = phrase.split()
            if not words:  # an empty phrase leaves the previous words last
                after |= frontier
                continue
            bigrams.update((w, words[0]) for w in frontier)
            bigrams.update(zip(words, words[1:], strict=False))
            after.add(words[-1])
        frontier = after
    return frontier


@lru_cache(maxsize=1)
def grammar_bigrams() -> frozenset[tuple[str, str]]:
    """Every pair of adjacent words that a review of the grammar can hold (the opening included),
    enumerated from the templates that `review` samples from."""
    bigrams: set[tuple[str, str]] = set()
    start: set[str] = set()
    for template in OPENING_TEMPLATES:
        start |= _extend({"<s>"}, template, bigrams)
    after_be = _extend(set(BE), AFTER_BE, bigrams)
    first = (start - set(BE)) | after_be  # an opening ending in "was" always says how first
    clauses = [t for tone in WORDS for t in clause_templates(tone)]
    frontier, ends = first, set(first)
    for _ in range(2):  # up to two more clauses
        after_connector = _extend(frontier, (CONNECTORS,), bigrams)
        frontier = set().union(*(_extend(after_connector, t, bigrams) for t in clauses))
        ends |= frontier
    _extend(ends, (_slot("."),), bigrams)
    return frozenset(b for b in bigrams if b[0] != "<s>")


@dataclass
class ArithSpec:
    max_a: int = 49  # first operand in [0, max_a]
    max_b: int = 9  # second operand in [0, max_b]
    teacher_error_rate: float = 0.3  # share of teacher answers with one wrong digit


def arith_prompt(a: int, b: int) -> str:
    return f"{a}+{b}="


def noisy_answer(rng: random.Random, a: int, b: int, error_rate: float) -> str:
    answer = list(str(a + b))
    if rng.random() < error_rate:
        i = rng.randrange(len(answer))
        answer[i] = rng.choice([d for d in "0123456789" if d != answer[i]])
    return "".join(answer)


def arith_problems(spec: ArithSpec) -> list[tuple[int, int]]:
    return [(a, b) for a in range(spec.max_a + 1) for b in range(spec.max_b + 1)]


def split_arith(
    spec: ArithSpec, seed: int, n_eval: int
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(training problems, evaluation problems), disjoint: no evaluation sum is ever taught."""
    problems = arith_problems(spec)
    random.Random(seed).shuffle(problems)
    if not 0 < n_eval < len(problems):
        raise ValueError(
            f"n_eval_prompts={n_eval} must lie in 1..{len(problems) - 1} (the arith problems)"
        )
    return problems[n_eval:], problems[:n_eval]
