"""The `discovered` demo row (full demo only): a short offline objective discovery on the toy
sentiment world, then its best candidate trained exactly like the `dpo` and `discopop` rows.

The proxy that ranks candidates is cheaper than a demo row (fewer steps, fewer evaluation
prompts), so the row re-trains the winner with the row settings: its figures sit beside dpo
and discopop on equal terms, and the proxy fitness is kept next to them to show how well the
proxy predicted.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

from prefalign.demo.preference import PreferenceRow, run_preference_row
from prefalign.demo.settings import DemoSettings
from prefalign.demo.worlds import World, get_world_family
from prefalign.discovery.archive import Archive
from prefalign.discovery.export import function_name
from prefalign.discovery.recipe import DiscoverConfig, run_discover


def discovery_config(out_dir: Path) -> DiscoverConfig:
    # Three generations of four after the six registry baselines: 18 proxy runs.
    return DiscoverConfig(out_dir=str(out_dir), generations=3, candidates_per_generation=4)


def demo_discovery(
    world: World, settings: DemoSettings, log=print, config: DiscoverConfig | None = None
) -> dict:
    """The row: discovery (`config`, default `discovery_config`), then its best candidate
    trained as a demo row."""
    out_dir = Path(settings.out_dir) / "discovery"
    shutil.rmtree(out_dir, ignore_errors=True)  # a demo run starts fresh, like its other rows
    config = replace(config, out_dir=str(out_dir)) if config else discovery_config(out_dir)
    archive = run_discover(
        config, log=lambda *_: None, task=get_world_family(settings.world).task_of(world)
    )
    best = archive.best_proposed()
    if best is None:
        raise RuntimeError(
            f"the demo's discovery produced no valid candidate; see {out_dir / 'archive.jsonl'}"
        )
    spec = (
        f"{out_dir / 'best_objective.py'}:{function_name(best['code'])}"  # written by run_discover
    )
    log(
        f"  best of {summary(archive)['proposed']} candidates: {best['name']} "
        f"(proxy fitness {best['fitness']:.4f})"
    )
    row = run_preference_row(world, settings, "discovered", PreferenceRow("discovered", code=spec))
    row.update(
        objective=best["name"],
        code=best["code"],
        proxy=best["metrics"],
        proxy_fitness=best["fitness"],
        leaderboard=[
            {key: r.get(key) for key in ("name", "origin", "generation", "fitness")}
            | {"gold": r["metrics"].get("gold"), "kl": r["metrics"].get("kl")}
            for r in archive.leaderboard(8)
        ],
        candidates=summary(archive),
        archive=str(out_dir / "archive.jsonl"),
    )
    return row


def summary(archive: Archive) -> dict:
    proposed = [r for r in archive if r.get("generation", 0) >= 0]
    return {
        "proposed": len(proposed),
        "valid": sum(bool(r.get("valid")) for r in proposed),
        "rejected": sum(not r.get("valid") for r in proposed),
    }
