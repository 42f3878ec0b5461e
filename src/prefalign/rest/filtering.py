"""Which grown samples an Improve step keeps: a rising threshold on (normalized) rewards, then a
cap per prompt.

- Thresholds: an explicit list, one per Improve step, or a linear schedule from `start` to `end`.
  They may not fall: each Improve step trains on a subset of better samples than the last.
- Scores: the raw reward, the reward min-max scaled to [0, 1] over the pool (`min_max`, as the
  ReST paper normalizes before thresholding), or its percentile in [0, 1] among all grown
  samples (`global_percentile`) or among the samples of the same prompt
  (`per_prompt_percentile`: a hard prompt's best answers count as good even if an easy
  prompt's worst beat them). Tied samples share their block's mean rank, except those tied at
  the minimum, which beat no one and score 0: a prompt whose samples all failed alike keeps
  none of them.
- An optional absolute floor (`min_reward`) on the raw reward: a sample at or below it is never
  kept, so a prompt with no sample above it keeps nothing, however its samples rank.
- A sample is kept when its score is strictly above the threshold (as in the ReST paper);
  then at most `max_per_prompt` per prompt survive, the best first (ReST-EM keeps ~10).
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Literal

from prefalign.config import ConfigError

Normalize = Literal["none", "min_max", "global_percentile", "per_prompt_percentile"]


@dataclass
class ThresholdSchedule:
    start: float = 0.0
    end: float = 0.0
    steps: int = 0  # rises over this many Improve steps, then stays at `end` (0: over all of them)


def threshold_list(
    n_steps: int, values: Sequence[float] | None, schedule: ThresholdSchedule | None
) -> list[float]:
    """One threshold per Improve step, from an explicit list or a linear schedule (the first step
    uses `start`, step `steps - 1` and later ones `end`)."""
    if values:
        if len(values) != n_steps:
            raise ConfigError(
                f"config key 'improve.thresholds': {len(values)} values for {n_steps} "
                "Improve steps; give one per step"
            )
        out = [float(v) for v in values]
    else:
        schedule = schedule or ThresholdSchedule()
        span = (schedule.steps or n_steps) - 1
        out = [
            schedule.start
            + (schedule.end - schedule.start) * (min(k, span) / span if span > 0 else 0.0)
            for k in range(n_steps)
        ]
    if any(b < a for a, b in zip(out, out[1:], strict=False)):
        raise ConfigError(f"config key 'improve.thresholds': the schedule must not fall, got {out}")
    return out


def percentiles(values: Sequence[float]) -> list[float]:
    """Mid-rank percentile of each value in [0, 1]; ties share one value, and values equal to
    the minimum score 0 (a tie must not lift a sample above the ones it failed with)."""
    n = len(values)
    if n == 1:
        return [0.0]
    order = sorted(range(n), key=lambda i: values[i])
    out = [0.0] * n
    start = 0
    while start < n:
        end = start
        while end + 1 < n and values[order[end + 1]] == values[order[start]]:
            end += 1
        rank = (start + end) / 2 if start > 0 else 0.0  # mean 0-based rank of the tied block
        for k in range(start, end + 1):
            out[order[k]] = rank / (n - 1)
        start = end + 1
    return out


def min_max(values: Sequence[float]) -> list[float]:
    """Values scaled to [0, 1] by their minimum and maximum; all 0 when they are all equal."""
    lo, hi = min(values, default=0.0), max(values, default=0.0)
    return [(v - lo) / (hi - lo) if hi > lo else 0.0 for v in values]


def normalized_scores(
    rewards: Sequence[float], groups: Sequence[Hashable], mode: Normalize
) -> list[float]:
    """The scores thresholds apply to: raw rewards, or percentiles globally or within each
    prompt."""
    if mode == "none":
        return [float(r) for r in rewards]
    if mode == "min_max":
        return min_max(rewards)
    if mode == "global_percentile":
        return percentiles(rewards)
    if mode != "per_prompt_percentile":
        raise ConfigError(
            f"config key 'improve.normalize': got {mode!r}, "
            "allowed: none, min_max, global_percentile, per_prompt_percentile"
        )
    members: dict[Hashable, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    out = [0.0] * len(rewards)
    for idx in members.values():
        for i, p in zip(idx, percentiles([rewards[i] for i in idx]), strict=True):
            out[i] = p
    return out


def select(
    scores: Sequence[float],
    groups: Sequence[Hashable],
    threshold: float,
    max_per_prompt: int = 0,
    seed: int = 0,
    dedup_keys: Sequence[Hashable] | None = None,
    rewards: Sequence[float] | None = None,
    min_reward: float | None = None,
) -> list[int]:
    """Indices (ascending) of samples with score > threshold, at most `max_per_prompt` per group
    (0: no cap), best scores first, ties broken by a seeded shuffle. With `dedup_keys`, a group
    keeps one sample per key (identical responses count once). With `min_reward`, a sample
    whose raw reward (`rewards`) is not above it is dropped first."""
    if min_reward is not None and rewards is None:
        raise ValueError("select: min_reward needs the raw rewards (rewards=...)")
    passing = [
        i
        for i, s in enumerate(scores)
        if s > threshold and (min_reward is None or rewards[i] > min_reward)
    ]
    rng = random.Random(seed)
    rng.shuffle(passing)
    passing.sort(key=lambda i: -scores[i])  # stable: the shuffle breaks ties
    taken: dict[Hashable, int] = defaultdict(int)
    seen: set[tuple[Hashable, Hashable]] = set()
    kept = []
    for i in passing:
        if max_per_prompt and taken[groups[i]] >= max_per_prompt:
            continue
        if dedup_keys is not None:
            key = (groups[i], dedup_keys[i])
            if key in seen:
                continue
            seen.add(key)
        taken[groups[i]] += 1
        kept.append(i)
    return sorted(kept)
