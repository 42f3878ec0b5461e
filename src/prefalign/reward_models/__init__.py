"""Sequence reward models: one reader (the scalar head at the last attended position) used by
reward-model training, ReST scoring, ARGS and best-of-N, and the `prefalign rm train` recipe.

>>> from prefalign.reward_models import RewardModel
>>> rm = RewardModel.from_pretrained("runs/rm")  # doctest: +SKIP
>>> rm.score(["the movie was"], [" great ."])  # doctest: +SKIP
"""

from prefalign.reward_models.reader import (
    SequenceRewardModel,
    as_sequence_reward_model,
    last_attended,
    load_reward_model,
    sequence_rewards,
)
from prefalign.reward_models.scoring import RewardModel

# The recipe pulls in the Trainer (accelerate, transformers): imported on first use, so readers
# of a trained model (ARGS, best-of-N) do not pay for it.
_RECIPE = ("RMData", "RMResult", "RewardModelConfig", "build_reward_model", "train_reward_model")


def __getattr__(name: str):
    if name in _RECIPE:
        from prefalign.reward_models import train

        return getattr(train, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "RMData",
    "RMResult",
    "RewardModel",
    "RewardModelConfig",
    "SequenceRewardModel",
    "as_sequence_reward_model",
    "build_reward_model",
    "last_attended",
    "load_reward_model",
    "sequence_rewards",
    "train_reward_model",
]
