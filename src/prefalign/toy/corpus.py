"""Corpus generators of the toy world: short movie reviews from a grammar, and noisy arithmetic.

Reviews mix positive, negative and neutral clauses in equal measure, so the supervised policy
is neutral on average and alignment towards positive sentiment has room to move. Arithmetic
answers come from a noisy teacher, so the supervised policy is right only part of the time.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

POSITIVE = (
    "great wonderful amazing excellent brilliant lovely beautiful superb fantastic delightful charming "
    "enjoyable good fun happy perfect stunning touching hilarious clever sweet warm fresh exciting "
    "inspiring memorable impressive gorgeous pleasant brave elegant graceful magnificent outstanding "
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
FILMS = "the movie|this film|the show|this movie|the new film|this series|the sequel".split("|")
INTENSIFIERS = ("", "", "", "very ", "really ", "quite ", "so ", "truly ", "rather ", "pretty ")
VERBS_POS = "loved enjoyed liked adored admired recommend".split()
VERBS_NEG = "hated disliked regret avoided resented".split()
VERBS_NEU = "watched saw noticed remember finished".split()


def review_clause(rng: random.Random, tone: str) -> str:
    words = {"pos": POSITIVE, "neg": NEGATIVE, "neu": NEUTRAL}[tone]
    verbs = {"pos": VERBS_POS, "neg": VERBS_NEG, "neu": VERBS_NEU}[tone]
    form = rng.randrange(4)
    if form == 0:
        return f"{rng.choice(SUBJECTS)} was {rng.choice(INTENSIFIERS)}{rng.choice(words)}"
    if form == 1:
        return f"i {rng.choice(verbs)} {rng.choice(SUBJECTS)}"
    if form == 2:
        return f"{rng.choice(INTENSIFIERS)}{rng.choice(words)} and {rng.choice(words)}"
    return f"{rng.choice(words)} , {rng.choice(SUBJECTS)} felt {rng.choice(words)}"


def review_text(rng: random.Random) -> str:
    """A whole review: a clause about the film, then up to two clauses of any tone."""
    tones = [rng.choice(("pos", "neg", "neu")) for _ in range(rng.randint(1, 3))]
    first = rng.choice(VERBS_POS + VERBS_NEG + VERBS_NEU) if rng.random() < 0.3 else None
    if first:
        text = f"i {first} {rng.choice(FILMS)}"
    else:
        words = {"pos": POSITIVE, "neg": NEGATIVE, "neu": NEUTRAL}[tones[0]]
        text = f"{rng.choice(FILMS)} {rng.choice(('was', 'is', 'felt'))} {rng.choice(INTENSIFIERS)}{rng.choice(words)}"
    for tone in tones[1:]:
        text += rng.choice((" and ", " but ", " . ", " , ")) + review_clause(rng, tone)
    return text + " ."


def review(rng: random.Random, prompt_words: int = 3) -> tuple[str, str]:
    """(prompt, completion): the prompt is the first words of a review, the completion the rest."""
    words = review_text(rng).split(" ")
    return " ".join(words[:prompt_words]), " " + " ".join(words[prompt_words:])


@dataclass
class ArithSpec:
    max_a: int = 49  # first operand in [0, max_a]
    max_b: int = 9  # second operand in [0, max_b]
    teacher_error_rate: float = 0.3  # share of teacher answers with one wrong digit
    # A model of a million parameters does not learn the carry algorithm in a few hundred steps,
    # so evaluation problems are the training problems (False) unless asked otherwise: the task
    # is to rise above a noisy teacher, not to generalise to unseen sums.
    held_out_problems: bool = False


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


def split_arith(spec: ArithSpec, seed: int, n_eval: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(training problems, evaluation problems); disjoint when `held_out_problems`."""
    problems = arith_problems(spec)
    random.Random(seed).shuffle(problems)
    if spec.held_out_problems:
        return problems[n_eval:], problems[:n_eval]
    return problems, problems[:n_eval]
