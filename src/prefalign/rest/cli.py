"""Command-line entry points of ReST; `prefalign.cli` wires them as `prefalign rest` and
`prefalign rm train`. Each takes the parsed arguments: `.config` (YAML path or None),
`.overrides` (key.sub=value strings) and `.resume`."""

from __future__ import annotations

import argparse
import json

from prefalign.config import load_config
from prefalign.reward_models.cli import run_rm_train_cli

__all__ = ["run_rest_cli", "run_rm_train_cli"]  # rm train lives in prefalign.reward_models


def run_rest_cli(args: argparse.Namespace, config=None) -> int:
    from prefalign.rest.loop import RestConfig, run_rest

    config = config or load_config(RestConfig, args.config, list(args.overrides or []))
    result = run_rest(config, resume=bool(getattr(args, "resume", False)))
    last = next((r["eval"] for r in reversed(result.records) if r.get("eval")), {})
    summary = {
        "out_dir": str(result.out_dir),
        "final_model": result.final_model,
        "steps": len(result.records),
        "seconds": round(result.seconds, 1),
        "plot": str(result.plot) if result.plot else None,
        "final_eval": last,
    }
    print(json.dumps(summary, indent=2))
    return 0
