"""The demo: every method on a world family (the embedded toy world by default), one report.

    run.py         run_demo: rows x tasks, results.json, run.json, report
    settings.py    DemoSettings, evaluate_model (one evaluation for every row)
    worlds.py      World (what rows read), WorldFamily and its registry (`--world`)
    toy.py         the toy family: its tasks and rows
    preference.py  DPO / IPO / KTO / DiscoPOP rows, frozen and trust-region references
    rest.py        the ReST row         genarm.py  the GenARM row
    discovery.py   the discovered-objective row (full demo only)

Nothing else in prefalign imports this package.
"""

from prefalign.demo.preference import PREFERENCE_ROWS, PreferenceRow, run_preference_row
from prefalign.demo.run import run_demo
from prefalign.demo.settings import DemoSettings, evaluate_model, format_row, method_sft
from prefalign.demo.worlds import (
    World,
    WorldFamily,
    get_world_family,
    register_world_family,
    world_family_names,
)

__all__ = [
    "PREFERENCE_ROWS",
    "DemoSettings",
    "PreferenceRow",
    "World",
    "WorldFamily",
    "evaluate_model",
    "format_row",
    "get_world_family",
    "method_sft",
    "register_world_family",
    "run_demo",
    "run_preference_row",
    "world_family_names",
]
