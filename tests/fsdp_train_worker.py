"""Run several `prefalign train` command lines in one interpreter: under torchrun, one process
group serves them all, so a test pays the interpreter and torch start-up once, not per run.

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_train_worker.py jobs.json

jobs.json is a list of argument lists (what follows `prefalign`); each job's output goes to
`<trainer.out_dir>.rank<R>.log`, ending with its exit code."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

from prefalign.cli import main


def out_dir(argv: list[str]) -> Path:
    return Path(next(a.split("=", 1)[1] for a in argv if a.startswith("trainer.out_dir=")))


def run_jobs(jobs: list[list[str]]) -> None:
    rank = os.environ.get("RANK", "0")
    for argv in jobs:
        log = out_dir(argv).with_name(f"{out_dir(argv).name}.rank{rank}.log")
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            code = main(argv)
            print(f"exit code {code}")


if __name__ == "__main__":
    run_jobs(json.loads(Path(sys.argv[1]).read_text()))
