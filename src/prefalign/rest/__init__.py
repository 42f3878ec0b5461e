"""ReST (Reinforced Self-Training) and ReST-EM: Grow (sample + score), Improve (filter + any loss).

>>> from prefalign.config import load_config
>>> from prefalign.rest import RestConfig, run_rest
>>> config = load_config(RestConfig, "rest.yaml", ["grow_steps=3"])  # doctest: +SKIP
>>> result = run_rest(config, resume=True)  # doctest: +SKIP
"""

from prefalign.rest.evaluate import EvalSpec
from prefalign.rest.filtering import (
    ThresholdSchedule,
    min_max,
    normalized_scores,
    percentiles,
    select,
    threshold_list,
)
from prefalign.rest.grow import GrownSample, GrowSpec, grow, read_samples, write_samples
from prefalign.rest.improve import ImproveData, ImproveSpec, build_data, improve
from prefalign.rest.loop import RestConfig, RestResult, run_rest
from prefalign.rest.rewards import RewardSpec, load_reward
from prefalign.reward_models.scoring import RewardModel
from prefalign.reward_models.train import RewardModelConfig, RMResult, train_reward_model

__all__ = [
    "EvalSpec",
    "GrowSpec",
    "GrownSample",
    "ImproveData",
    "ImproveSpec",
    "RMResult",
    "RestConfig",
    "RestResult",
    "RewardModel",
    "RewardModelConfig",
    "RewardSpec",
    "ThresholdSchedule",
    "build_data",
    "grow",
    "improve",
    "load_reward",
    "min_max",
    "normalized_scores",
    "percentiles",
    "read_samples",
    "run_rest",
    "select",
    "threshold_list",
    "train_reward_model",
    "write_samples",
]
