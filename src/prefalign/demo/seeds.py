"""Seed bands for demo rows: a row's figures are the mean over its runs with different seeds,
and each figure's band is the [min, max] over those runs, so a table says how far one run may
move (batch order and evaluation samples change with the seed; the world stays the same)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

BANDED = ("gold_reward", "kl", "accuracy")  # figures that get a band
AVERAGED = ("gold_reward_se", "kl_se", "mean_length", "train_seconds")


def with_seed_band(runs: Sequence[dict], seeds: Sequence[int]) -> dict:
    """One row from the same row's runs with `seeds`: the first run's other fields, the mean of
    the figures over seeds, `FIELD_band` = [min, max] and `FIELD_seed_sd` for the banded ones."""
    if len(runs) != len(seeds) or not runs:
        raise ValueError(f"{len(runs)} runs for seeds {list(seeds)}")
    row = dict(runs[0])
    row["seeds"] = list(seeds)
    for key in BANDED + AVERAGED:
        values = [r[key] for r in runs if isinstance(r.get(key), int | float)]
        if len(values) != len(runs):
            continue
        row[key] = round(sum(values) / len(values), 4)
        if key in BANDED:
            row[f"{key}_band"] = [round(min(values), 4), round(max(values), 4)]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            row[f"{key}_seed_sd"] = round(sd, 4)
    if len(runs) > 1:
        row["per_seed"] = [{k: r.get(k) for k in BANDED if k in r} for r in runs]
    return row
