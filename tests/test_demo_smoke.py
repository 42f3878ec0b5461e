"""The demo end to end on a mini toy world (tiny corpus, few steps): every row runs and the
results file, report and plots follow the contract the README describes."""

from __future__ import annotations

import json

import pytest

from prefalign import demo


@pytest.mark.slow
def test_demo_runs_every_row_on_a_mini_world(tmp_path, mini_worlds):
    results = demo.run_demo(tmp_path / "out", quick=True, log=lambda *_: None, worlds=mini_worlds)

    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["seconds"] > 0
    sentiment = saved["tasks"]["sentiment"]["methods"]
    assert set(demo.PREFERENCE_ROWS) | {"sft", "genarm"} <= set(sentiment)
    assert "discovered" not in sentiment  # the full demo's row only
    genarm = sentiment["genarm"]
    assert [p["alpha"] for p in genarm["sweep"]] == [0.0, 1.0, 3.0] and genarm["sweep"][0][
        "kl"
    ] == pytest.approx(0.0, abs=1e-4)
    assert len(genarm["tradeoff"]) == 3 and "skipped" in genarm["weak_to_strong"]
    assert {"sft", "rest"} <= set(saved["tasks"]["arith"]["methods"]) and "rest" in sentiment
    assert saved["tasks"]["arith"]["methods"]["sft"]["accuracy"] is not None
    for row in sentiment.values():
        assert {"gold_reward", "kl", "seconds"} <= set(row)
    assert sentiment["sft"]["kl"] == pytest.approx(0.0, abs=1e-4)  # the SFT policy is the reference
    assert any(row["kl"] > 0 for name, row in sentiment.items() if name != "sft")
    assert (tmp_path / "out" / "report.md").exists() and (tmp_path / "out" / "report.html").exists()
    assert (tmp_path / "out" / "sentiment_reward_vs_kl.png").exists() or list(
        (tmp_path / "out").rglob("*.png")
    )
    assert results["tasks"].keys() == {"sentiment", "arith"}
    page = (tmp_path / "out" / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 2  # a reward-vs-KL frontier per task, embedded
    assert "tr-dpo-soft" in page and "gold_reward" in page  # the results table
