"""One row of the SmolLM2 demo, run alone exactly as `prefalign demo --world smollm2` runs it
(or of another demo world: `--world toy`).

    PREFALIGN_CACHE=... python bench/smol_row.py ROW [--task sentiment] [--headline-only]
        [--world smollm2] [--mmap-threshold-kib N]

Prints the row's figures as one JSON line (a preference row's beta sweep left out of the print)
with its wall and CPU seconds, system CPU seconds, minor page faults and peak RSS.
`--headline-only` trains a preference row at its own beta only, without the frontier sweep's
extra betas. `--mmap-threshold-kib` replaces the demo's process-wide mmap threshold (SmolLM2's
is 0, off).
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
    args = parser.parse_args()
    family = get_world_family(args.world)
    if args.mmap_threshold_kib is None:
        threshold = family.decide_mmap_threshold()
    else:
        threshold = decide_mmap_threshold(args.mmap_threshold_kib, "--mmap-threshold-kib")
    world = family.load(args.task)
    out = Path(tempfile.mkdtemp(prefix="demo-row-"))
    settings = DemoSettings.make(False, out, world=family.name)
    wall, cpu = time.time(), time.process_time()
    method = family.rows(args.task, False)[args.row]
    if args.headline_only and args.row in toy_preference.PREFERENCE_ROWS:
        row = replace(toy_preference.PREFERENCE_ROWS[args.row], sweep_betas=())
        module = smollm2 if family.name.startswith("smollm2") else toy_preference
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
    if "sweep" in result:
        shown["sweep"] = [{k: p[k] for k in ("beta", "gold_reward", "kl")} for p in result["sweep"]]
    print(json.dumps(shown))
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
