"""One row of the SmolLM2 demo, run alone exactly as `prefalign demo --world smollm2` runs it
(or of another demo world: `--world toy`).

    PREFALIGN_CACHE=... python bench/smol_row.py ROW [--task sentiment] [--headline-only]
        [--world smollm2] [--mmap-threshold-kib N] [--rest-max-new-tokens N] [--rest K=V ...]

Prints the row's figures as one JSON line (a preference row's beta sweep left out of the print)
with its wall and CPU seconds, system CPU seconds, minor page faults and peak RSS.
`--headline-only` trains a preference row at its own beta only, without the frontier sweep's
extra betas. `--mmap-threshold-kib` replaces the demo's process-wide mmap threshold (0, off).
`--rest-max-new-tokens` sets the SmolLM2 rest row's Grow cap (default: the world's reply cap)
and `--rest` adds a ReST config override (for example `--rest improve.unfinished=keep`).
The world is built first if the cache lacks it.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from prefalign.demo import preference as toy_preference
from prefalign.demo import smollm2
from prefalign.demo.settings import DemoSettings
from prefalign.demo.worlds import get_world_family
from prefalign.training.malloc import decide_mmap_threshold


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("row")
    parser.add_argument("--task", default="sentiment")
    parser.add_argument("--headline-only", action="store_true")
    parser.add_argument(
        "--mmap-threshold-kib", type=int, help="the process's mmap threshold (default: the demo's)"
    )
    parser.add_argument("--world", default="smollm2", help="the demo world family")
    parser.add_argument("--rest-max-new-tokens", type=int, default=0)
    parser.add_argument("--rest", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    family = get_world_family(args.world)
    real = family.name.startswith("smollm2")
    if not real and (args.rest or args.rest_max_new_tokens):
        parser.error("--rest and --rest-max-new-tokens are the SmolLM2 rest row's")
    if args.mmap_threshold_kib is None:
        threshold = family.decide_mmap_threshold()
    else:
        threshold = decide_mmap_threshold(args.mmap_threshold_kib, "--mmap-threshold-kib")
    world = family.load(args.task)
    out = Path(tempfile.mkdtemp(prefix="demo-row-"))
    settings = DemoSettings.make(False, out, world=family.name)
    if real:  # the rows take these as they are
        settings = replace(
            smollm2.smol_settings(settings),
            rest_max_new_tokens=args.rest_max_new_tokens,
            rest_overrides=tuple(args.rest),
        )
    wall, cpu = time.time(), time.process_time()
    method = family.rows(args.task, False)[args.row]
    if args.headline_only and args.row in toy_preference.PREFERENCE_ROWS:
        row = replace(toy_preference.PREFERENCE_ROWS[args.row], sweep_betas=())
        module = smollm2 if real else toy_preference
        method = module.preference_method(args.row, row)
    result = method(world, settings)
    usage = resource.getrusage(resource.RUSAGE_SELF)  # of the whole process, world load too
    result.update(
        wall_seconds=round(time.time() - wall, 1),
        cpu_seconds=round(time.process_time() - cpu, 1),
        system_seconds=round(usage.ru_stime, 1),
        minor_faults=usage.ru_minflt,
        peak_rss_mb=round(usage.ru_maxrss / 1024),
        mmap_threshold_kib=threshold.kib,
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
