"""The full demo's `discovered` row on a miniature world: a real (short) offline discovery whose
best proposed objective is re-trained with the demo's row settings and evaluated."""

from __future__ import annotations

import json

import pytest

from prefalign import objectives
from prefalign.demo import DemoSettings
from prefalign.demo.discovery import demo_discovery
from prefalign.discovery.recipe import DiscoverConfig, ProxySpec


@pytest.mark.slow
def test_discovered_row_trains_the_best_proposed_candidate(tmp_path, mini_worlds):
    config = DiscoverConfig(
        generations=2,
        candidates_per_generation=2,
        baselines=True,
        proxy=ProxySpec(steps=4, batch_size=8, n_eval_prompts=8, samples_per_prompt=1),
    )
    settings = DemoSettings.make(True, tmp_path / "demo")
    row = demo_discovery(mini_worlds["sentiment"], settings, log=lambda *_: None, config=config)

    records = [json.loads(line) for line in open(row["archive"])]
    proposed = [r for r in records if r["generation"] >= 0]
    assert len(proposed) == 4 and sum(r["generation"] == -1 for r in records) == 6
    # The best new behaviour: a proposal that computes a baseline's loss is that baseline.
    baseline_behaviours = {r["behaviour"] for r in records if r["generation"] == -1}
    best = max(
        (r for r in proposed if r["valid"] and r["behaviour"] not in baseline_behaviours),
        key=lambda r: r["fitness"],
    )
    assert row["objective"] == best["name"] and row["proxy_fitness"] == pytest.approx(
        best["fitness"]
    )
    assert row["candidates"] == {
        "proposed": 4,
        "valid": sum(r["valid"] for r in proposed),
        "rejected": sum(not r["valid"] for r in proposed),
    }
    # The row is a real training run of that code, evaluated like every other demo row.
    assert row["kl"] > 0 and -1 <= row["gold_reward"] <= 1 and row["beta"] == 0.1
    assert (
        settings.out_dir
        / "runs"
        / "sentiment"
        / "discovered-beta0.1-seed0"
        / "final"
        / "model.safetensors"
    ).exists()
    spec = f"{settings.out_dir / 'discovery' / 'best_objective.py'}"
    assert (
        objectives.load_user_objective(
            f"{spec}:{row['code'].split('(')[0].removeprefix('def ').strip()}"
        )
        is not None
    )
    assert [r["fitness"] for r in row["leaderboard"]] == sorted(
        (r["fitness"] for r in row["leaderboard"]), reverse=True
    )
