"""One row of the SmolLM2 demo, run alone exactly as `prefalign demo --world smollm2` runs it.

    PREFALIGN_CACHE=... python bench/smol_row.py ROW [--task sentiment] [--headline-only]
        [--rest-max-new-tokens N] [--rest KEY=VALUE ...]

Prints the row's figures as one JSON line (a preference row's beta sweep left out of the print)
with its wall and CPU seconds. `--headline-only` trains a preference row at its own beta only,
without the frontier sweep's extra betas. `--rest-max-new-tokens` sets the rest row's Grow cap
(default: the world's reply cap) and `--rest` adds a ReST config override (for example
`--rest improve.unfinished=keep`). The world is built first if the cache lacks it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from prefalign.demo.preference import PREFERENCE_ROWS
from prefalign.demo.smollm2 import SmolDemoSettings, run_smol_preference_row, smol_rows
from prefalign.smol.world import get_smol_world


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("row")
    parser.add_argument("--task", default="sentiment")
    parser.add_argument("--headline-only", action="store_true")
    parser.add_argument("--rest-max-new-tokens", type=int, default=0)
    parser.add_argument("--rest", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    world = get_smol_world(args.task)
    out = Path(tempfile.mkdtemp(prefix="smol-row-"))
    settings = replace(
        SmolDemoSettings.make(False, out),
        rest_max_new_tokens=args.rest_max_new_tokens,
        rest_overrides=tuple(args.rest),
    )
    wall, cpu = time.time(), time.process_time()
    if args.headline_only and args.row in PREFERENCE_ROWS:
        row = replace(PREFERENCE_ROWS[args.row], sweep_betas=())
        result = run_smol_preference_row(world, settings, args.row, row)
    else:
        result = smol_rows(args.task)[args.row](world, settings)
    result.update(
        wall_seconds=round(time.time() - wall, 1), cpu_seconds=round(time.process_time() - cpu, 1)
    )
    long = ("sweep", "code", "candidates", "tradeoff", "baselines")
    shown = {k: v for k, v in result.items() if k not in long and not isinstance(v, list)}
    if isinstance(result.get("steps"), list):  # rest: each Grow and Improve step, compact
        shown["steps"] = result["steps"]
    if "sweep" in result:
        shown["sweep"] = [{k: p[k] for k in ("beta", "gold_reward", "kl")} for p in result["sweep"]]
    print(json.dumps(shown))
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
