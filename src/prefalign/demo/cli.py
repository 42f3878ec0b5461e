"""`prefalign demo`, as a function of the parsed arguments (wired by `prefalign.cli`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from prefalign.demo.run import run_demo


def run_demo_cli(args: argparse.Namespace) -> int:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    run_demo(out_dir=Path(args.out), quick=args.quick, tasks=tasks, world=args.world)
    return 0
