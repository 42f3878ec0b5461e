"""The genarm demo row end to end on the real sentiment toy world (slow: builds it if missing)."""

from __future__ import annotations

import pytest

from prefalign.demo import DemoSettings
from prefalign.genarm.demo import GenarmPlan, demo_genarm
from prefalign.toy.world import get_world


@pytest.mark.slow
def test_genarm_demo_row(tmp_path):
    world = get_world("sentiment")
    settings = DemoSettings(quick=True, n_eval_prompts=32, samples_per_prompt=2, out_dir=tmp_path)
    plan = GenarmPlan(alphas=[0.0, 1.0, 3.0], headline_alpha=1.0, tradeoff=[(2.0, 0.0), (0.0, 2.0)], arm_epochs=1.0)
    row = demo_genarm(world, settings, log=lambda *_: None, plan=plan)
    assert {"gold_reward", "kl", "sweep", "tradeoff", "weak_to_strong", "args", "best_of_n"} <= set(row)
    by_alpha = {p["alpha"]: p for p in row["sweep"]}
    assert by_alpha[0.0]["kl"] == pytest.approx(0.0, abs=1e-3)  # alpha 0 is the base itself
    # The toy's effect: the ARM was trained on sentiment pairs, so guidance raises sentiment.
    assert row["arm"]["pair_accuracy"] > 0.55
    assert by_alpha[3.0]["gold_reward"] > by_alpha[0.0]["gold_reward"]
    assert by_alpha[3.0]["kl"] > by_alpha[1.0]["kl"] > 0
    # Weights move along the trade-off: all brevity weight gives shorter text than all sentiment.
    sentiment_only, brevity_only = row["tradeoff"]
    assert brevity_only["brevity"] > sentiment_only["brevity"]
    assert (tmp_path / "genarm_alpha_sweep.png").stat().st_size > 0
    assert (tmp_path / "genarm_tradeoff.png").stat().st_size > 0
