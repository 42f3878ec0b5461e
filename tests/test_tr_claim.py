"""The decision rule and summaries of bench/tr_claim.py, on hand-made checkpoint curves."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import tr_claim  # noqa: E402


def run(points: list[tuple[float, float]]) -> dict:
    """A run from (kl, gold) checkpoints; the first is step 0."""
    return {"points": [{"step": 16 * i, "kl": kl, "gold": g} for i, (kl, g) in enumerate(points)]}


def test_best_within_a_budget_ignores_checkpoints_beyond_it():
    points = run([(0.0, 0.1), (3.0, 0.4), (10.0, 0.7), (40.0, 0.2)])["points"]
    assert tr_claim.best_within(points, 2.0) == 0.1
    assert tr_claim.best_within(points, 4.0) == 0.4
    assert tr_claim.best_within(points, 32.0) == 0.7


def test_verdict_follows_the_stated_rule():
    better = {
        (a, s): run([(0.0, 0.1), (1.5, 0.3 + d), (6.0, 0.5 + d), (30.0, 0.6 + d)])
        for s, d in enumerate([0.0, 0.01, 0.02])
        for a in ("tr",)
    }
    frozen = {
        ("frozen", s): run([(0.0, 0.1), (1.5, 0.2), (6.0, 0.3), (30.0, 0.4)]) for s in range(3)
    }
    diffs = tr_claim.paired_differences({**better, **frozen}, "tr", "frozen", [0, 1, 2])
    assert diffs["2.0"]["mean"] == pytest.approx(0.11)
    assert tr_claim.verdict(diffs) == "supported"
    reverse = tr_claim.paired_differences({**better, **frozen}, "frozen", "tr", [0, 1, 2])
    assert tr_claim.verdict(reverse) == "refuted"
    same = tr_claim.paired_differences(
        frozen | {("tr", s): frozen["frozen", s] for s in range(3)}, "tr", "frozen", [0, 1, 2]
    )
    assert tr_claim.verdict(same) == "no effect at this resolution"


def test_arm_names_say_their_setting():
    assert tr_claim.Arm("soft", 0.1, alpha=0.6, period=4).name == "soft-a0.6-p4-b0.1"
    assert tr_claim.Arm("hard", 0.3, tau=32).at(0.05, "proxy").name == "proxy-hard-tau32-b0.05"
    assert tr_claim.best_of_n_kl(1) == 0.0
    assert tr_claim.best_of_n_kl(4) == pytest.approx(1.386294 - 0.75, abs=1e-6)
