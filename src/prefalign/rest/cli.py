"""Command-line entry points of ReST; `prefalign.cli` wires them as `prefalign rest` and
`prefalign rm train`. Each takes the parsed arguments: `.config` (YAML path or None),
`.overrides` (key.sub=value strings) and `.resume`."""

from __future__ import annotations

import argparse
import json

from prefalign.config import load_config


def run_rest_cli(args: argparse.Namespace) -> int:
    from prefalign.rest.loop import RestConfig, run_rest

    config = load_config(RestConfig, args.config, list(args.overrides or []))
    result = run_rest(config, resume=bool(getattr(args, "resume", False)))
    last = next((r["eval"] for r in reversed(result.records) if r.get("eval")), {})
    summary = {"out_dir": str(result.out_dir), "final_model": result.final_model, "steps": len(result.records),
               "seconds": round(result.seconds, 1), "plot": str(result.plot) if result.plot else None, "final_eval": last}
    print(json.dumps(summary, indent=2))
    return 0


def run_rm_train_cli(args: argparse.Namespace) -> int:
    from prefalign.rest.reward_model import RewardModelConfig, train_reward_model

    config = load_config(RewardModelConfig, args.config, list(args.overrides or []))
    result = train_reward_model(config, resume=bool(getattr(args, "resume", False)))
    print(json.dumps({"held_out_pair_accuracy": round(result.accuracy, 4), "held_out_margin": round(result.margin, 4),
                      "n_eval_pairs": result.n_eval, "steps": result.train.steps, "model": str(result.path)}, indent=2))
    return 0
