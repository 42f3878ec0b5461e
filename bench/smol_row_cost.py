"""What one preference row of the SmolLM2 demo costs: its training alone, timed in one process.

    PREFALIGN_CACHE=... python bench/smol_row_cost.py dpo [key=value overrides ...]

Builds the row's config exactly as `prefalign demo --world smollm2` does (the toy row's
settings rescaled by `preference_overrides`), trains it, and prints wall and CPU seconds of the
training (model load, the frozen reference's log-prob cache and the steps; no evaluation).
The SmolLM2 sentiment world is built first if the cache lacks it.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

from prefalign.config import load_config
from prefalign.demo.preference import PREFERENCE_ROWS
from prefalign.demo.smollm2 import SmolDemoSettings, preference_overrides
from prefalign.smol.world import get_smol_world
from prefalign.training.preference import PreferenceConfig, run_preference


def main() -> None:
    name, extra = sys.argv[1], sys.argv[2:]
    world = get_smol_world("sentiment")
    out_root = Path(tempfile.mkdtemp(prefix="smol-row-"))
    settings = SmolDemoSettings.make(False, out_root)
    row = PREFERENCE_ROWS[name]
    base = row.config(world, out_root / name, row.beta, False)
    config = load_config(PreferenceConfig, None, preference_overrides(settings) + extra, base=base)
    wall, cpu = time.time(), time.process_time()
    trained = run_preference(config, log=print)
    wall, cpu = time.time() - wall, time.process_time() - cpu
    print(f"{name} {extra}: {trained.steps} steps, wall {wall:.1f} s, CPU {cpu:.1f} s")
    shutil.rmtree(out_root, ignore_errors=True)


if __name__ == "__main__":
    main()
