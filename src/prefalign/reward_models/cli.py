"""`prefalign rm train` from parsed arguments: `.config` (YAML path or None), `.overrides`
(key.sub=value strings) and `.resume`."""

from __future__ import annotations

import argparse
import json

from prefalign.config import load_config


def run_rm_train_cli(args: argparse.Namespace, config=None) -> int:
    from prefalign.reward_models.train import RewardModelConfig, train_reward_model

    config = config or load_config(RewardModelConfig, args.config, list(args.overrides or []))
    result = train_reward_model(config, resume=bool(getattr(args, "resume", False)))
    print(
        json.dumps(
            {
                "held_out_pair_accuracy": round(result.accuracy, 4),
                "held_out_margin": round(result.margin, 4),
                "n_eval_pairs": result.n_eval,
                "steps": result.train.steps,
                "model": str(result.path),
            },
            indent=2,
        )
    )
    return 0
