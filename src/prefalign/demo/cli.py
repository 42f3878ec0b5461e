"""`prefalign demo`, as a function of the parsed arguments (wired by `prefalign.cli`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from prefalign.demo.run import run_demo
from prefalign.errors import UserError


def run_demo_cli(args: argparse.Namespace) -> int:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    if args.seeds is not None and args.seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {args.seeds}")
    run_demo(
        out_dir=Path(args.out), quick=args.quick, tasks=tasks, world=args.world, seeds=args.seeds
    )
    return 0
