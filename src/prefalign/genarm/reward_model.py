"""Moved to `prefalign.reward_models.reader`; these names stay importable from here for one
release (`last_rewards` is `sequence_rewards`)."""

from prefalign.reward_models.reader import SequenceRewardModel, load_reward_model
from prefalign.reward_models.reader import sequence_rewards as last_rewards

__all__ = ["SequenceRewardModel", "last_rewards", "load_reward_model"]
