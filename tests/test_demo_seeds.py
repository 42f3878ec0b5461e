"""Seed bands of the demo's rows: the mean over seeds, with the [min, max] of each figure."""

from __future__ import annotations

import pytest

from prefalign.demo.preference import PREFERENCE_ROWS, run_preference_row
from prefalign.demo.seeds import with_seed_band
from prefalign.demo.settings import DemoSettings
from prefalign.report.demo import format_band, results_table

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


def test_band_is_the_mean_and_range_over_seeds():
    runs = [
        {"gold_reward": 0.5, "kl": 2.0, "name": "a"},
        {"gold_reward": 0.7, "kl": 4.0, "name": "b"},
    ]
    row = with_seed_band(runs, [0, 1])
    assert row["gold_reward"] == pytest.approx(0.6) and row["kl"] == pytest.approx(3.0)
    assert row["gold_reward_band"] == [0.5, 0.7] and row["kl_band"] == [2.0, 4.0]
    assert row["seeds"] == [0, 1] and row["name"] == "a"
    assert format_band(row, "gold_reward") == "0.500-0.700 (2 seeds)"
    assert format_band(with_seed_band(runs[:1], [0]), "gold_reward") == ""


def test_full_demo_runs_three_seeds_and_quick_one(tmp_path):
    assert DemoSettings.make(False, tmp_path).seeds == (0, 1, 2)
    assert DemoSettings.make(True, tmp_path).seeds == (0,)


def test_preference_row_reports_the_band_of_its_seeds(mini_worlds, tmp_path):
    settings = DemoSettings(
        quick=True, n_eval_prompts=8, samples_per_prompt=2, out_dir=tmp_path, seeds=(0, 1)
    )
    row = run_preference_row(mini_worlds["sentiment"], settings, "dpo", PREFERENCE_ROWS["dpo"])
    assert row["seeds"] == [0, 1]
    lo, hi = row["gold_reward_band"]
    assert lo <= row["gold_reward"] <= hi
    first, second = row["per_seed"]
    assert first != second  # the seed changes the batch order and the evaluation samples
    table = results_table({"tasks": {"sentiment": {"methods": {"dpo": row}}}})
    assert "(2 seeds)" in table


def test_seed_count_can_be_chosen(tmp_path):
    assert DemoSettings.make(True, tmp_path, seeds=3).seeds == (0, 1, 2)
    assert DemoSettings.make(False, tmp_path, seeds=1).seeds == (0,)
