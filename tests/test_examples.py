"""Every example config the README points to loads through the same schema the CLI uses."""

from __future__ import annotations

from pathlib import Path

import pytest

from prefalign.config import load_config
from prefalign.discovery.recipe import DiscoverConfig
from prefalign.genarm.arm import ArmConfig
from prefalign.rest.loop import RestConfig
from prefalign.reward_models import RewardModelConfig
from prefalign.training.preference import PreferenceConfig
from prefalign.training.sft import SFTConfig

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCHEMAS = {
    "tr-dpo.yaml": PreferenceConfig,
    "sft.yaml": SFTConfig,
    "rest.yaml": RestConfig,
    "rm.yaml": RewardModelConfig,
    "arm.yaml": ArmConfig,
    "discover.yaml": DiscoverConfig,
}


def test_every_example_has_a_schema():
    assert {p.name for p in EXAMPLES.glob("*.yaml")} == set(SCHEMAS)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_example_config_loads(name):
    config = load_config(SCHEMAS[name], EXAMPLES / name)
    assert isinstance(config, SCHEMAS[name])
