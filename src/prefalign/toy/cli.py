"""`prefalign toy build`, as a function of the parsed arguments (wired by `prefalign.cli`)."""

from __future__ import annotations

import argparse
import json

from prefalign.config import load_config
from prefalign.toy.world import ToyConfig, get_world


def run_toy_build_cli(args: argparse.Namespace) -> int:
    config = load_config(ToyConfig, None, args.overrides, base=ToyConfig.for_task(args.task))
    world = get_world(config.task, config, out=args.out)
    figures = world.info()["figures"]
    print(json.dumps({"task": world.task, "path": str(world.root), **figures}, indent=2))
    return 0
