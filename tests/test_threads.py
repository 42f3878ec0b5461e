"""`trainer.threads`: torch's intra-op thread count for the run (0 leaves torch's own)."""

from __future__ import annotations

import pytest
import torch
from test_trainer import collate_fn, config, gpt2, rows

from prefalign.logprobs import nll_loss
from prefalign.training.loop import Trainer


@pytest.fixture
def two_threads():
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(saved)


@pytest.mark.parametrize("threads,expected", [(1, 1), (0, 2)])
def test_trainer_threads_sets_torch_threads_for_the_run(tmp_path, two_threads, threads, expected):
    prompts, responses = rows()
    seen: list[int] = []

    def loss_fn(model, batch):
        seen.append(torch.get_num_threads())
        return nll_loss(model, batch), {}

    cfg = config(tmp_path, threads=threads)
    Trainer(gpt2(), cfg, [7] * 16).fit(collate_fn(prompts, responses), loss_fn)
    assert seen == [expected] * cfg.max_steps


def test_threads_is_a_checked_config_key():
    from prefalign.config import ConfigError, load_config
    from prefalign.training.preference import PreferenceConfig

    with pytest.raises(ConfigError, match="trainer.threads.*at least 0"):
        load_config(PreferenceConfig, None, ["trainer.threads=-1"])
