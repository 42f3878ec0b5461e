"""Moved to `prefalign.reward_models` (the recipe in `.train`, text scoring in `.scoring`);
these names stay importable from here for one release."""

from prefalign.reward_models.scoring import RewardModel
from prefalign.reward_models.train import (
    RewardModelConfig,
    RMData,
    RMResult,
    bt_loss_fn,
    build_reward_model,
    pair_accuracy,
    quiet_load_report,
    rewards_of,
    split_held_out,
    train_reward_model,
)

__all__ = [
    "RMData",
    "RMResult",
    "RewardModel",
    "RewardModelConfig",
    "bt_loss_fn",
    "build_reward_model",
    "pair_accuracy",
    "quiet_load_report",
    "rewards_of",
    "split_held_out",
    "train_reward_model",
]
