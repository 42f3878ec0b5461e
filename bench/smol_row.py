"""One row of the SmolLM2 demo, run alone exactly as `prefalign demo --world smollm2` runs it.

    PREFALIGN_CACHE=... python bench/smol_row.py ROW [--task sentiment] [--headline-only]
        [--mmap-threshold-kib N]

Prints the row's figures as one JSON line (a preference row's beta sweep left out of the print)
with its wall and CPU seconds, system CPU seconds, minor page faults and peak RSS.
`--headline-only` trains a preference row at its own beta only, without the frontier sweep's
extra betas. `--mmap-threshold-kib` replaces the demo's process-wide mmap threshold (0, off).
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

from prefalign.demo.preference import PREFERENCE_ROWS
from prefalign.demo.smollm2 import SmolDemoSettings, run_smol_preference_row, smol_rows
from prefalign.demo.worlds import get_world_family
from prefalign.smol.world import get_smol_world
from prefalign.training.malloc import decide_mmap_threshold


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("row")
    parser.add_argument("--task", default="sentiment")
    parser.add_argument("--headline-only", action="store_true")
    parser.add_argument(
        "--mmap-threshold-kib", type=int, help="the process's mmap threshold (default: the demo's)"
    )
    args = parser.parse_args()
    if args.mmap_threshold_kib is None:
        threshold = get_world_family("smollm2").decide_mmap_threshold()
    else:
        threshold = decide_mmap_threshold(args.mmap_threshold_kib, "--mmap-threshold-kib")
    world = get_smol_world(args.task)
    out = Path(tempfile.mkdtemp(prefix="smol-row-"))
    settings = SmolDemoSettings.make(False, out)
    wall, cpu = time.time(), time.process_time()
    if args.headline_only and args.row in PREFERENCE_ROWS:
        row = replace(PREFERENCE_ROWS[args.row], sweep_betas=())
        result = run_smol_preference_row(world, settings, args.row, row)
    else:
        result = smol_rows(args.task)[args.row](world, settings)
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
