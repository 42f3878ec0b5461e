"""The demo row `rest` on a miniature toy world (a 30k-parameter policy trained for a few steps):
the row has the demo's figures, the per-step records and the per-step plot."""

from __future__ import annotations

import json

import pytest
import torch

from prefalign.demo import DemoSettings
from prefalign.demo.rest import demo_rest
from prefalign.toy.world import ToyConfig, ToyModelSize, get_world


@pytest.mark.slow
@pytest.mark.parametrize("task", ["arith", "sentiment"])
def test_demo_row_with_per_step_curve(task, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        mini = ToyConfig(
            task=task,
            model=ToyModelSize(32, 2, 4, 64),
            corpus_size=600,
            pretrain_steps=10,
            sft_steps=5,
            n_pair_prompts=48,
            n_eval_pairs=16,
            n_train_prompts=64,
            n_eval_prompts=32,
            vocab_size=400,
            max_new_tokens=6 if task == "arith" else 24,
        )
        world = get_world(task, mini, out=tmp_path / "world", log=lambda *_: None)
        row = demo_rest(world, DemoSettings.make(True, tmp_path / "demo"))
    finally:
        torch.set_num_threads(threads)
    assert {
        "gold_reward",
        "kl",
        "seconds",
        "steps",
        "plot",
        "train_reward_gain",
        "gold_reward_gain",
    } <= set(row)
    assert (row["accuracy"] is not None) == (task == "arith")
    assert (tmp_path / "demo" / f"rest_{task}_steps.png").exists()
    kinds = [s["kind"] for s in row["steps"]]
    assert kinds[0] == "initial" and kinds.count("grow") == 2 and "improve" in kinds
    assert all("gold_reward" in s and "kl" in s for s in row["steps"] if s["kind"] == "improve")
    if task == "sentiment":
        assert 0 <= row["rm_pair_accuracy"] <= 1 and row["reward_kind"] == "model"
    json.dumps(row)  # goes into results.json as it is
