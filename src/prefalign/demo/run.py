"""`prefalign demo`: every method that exists, on one world family, in one report.

Each row is a function (world, settings) -> dict of figures; the demo runs the rows its world
family lists for each task, evaluates gold reward and KL to the SFT policy on the same held-out
prompts, and writes results.json, report.md and plots. Methods that do not exist yet are
absent, never faked.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from prefalign.demo.settings import DemoSettings, format_row
from prefalign.demo.worlds import World, WorldError, WorldFamily, get_world_family
from prefalign.manifest import write_manifest


def run_demo(
    out_dir: Path,
    quick: bool = False,
    tasks: list[str] | None = None,
    log=print,
    worlds: dict[str, World] | None = None,
    world: str = "toy",
    seeds: int | None = None,
) -> dict:
    """Run every row of every task of the world family `world`; `worlds` replaces the default
    worlds of some tasks (tests use mini ones)."""
    started, started_cpu = time.perf_counter(), cpu_seconds()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    family = get_world_family(world)
    tasks = checked_tasks(family, tasks, worlds)
    family.decide_mmap_threshold()
    settings = DemoSettings.make(quick, out_dir, world=family.name, seeds=seeds)
    results: dict = {
        "seconds": 0.0,
        "cpu_seconds": 0.0,
        "threads": torch_threads(),
        "quick": quick,
        "world": family.name,
        "world_label": family.label or family.name,
        "seeds": list(settings.seeds),
        "tasks": {},
    }
    for task in tasks:
        clock = Clock()
        task_world = (worlds or {}).get(task) or family.load(task, log=log)
        task_rows: dict[str, dict] = {}
        results["tasks"][task] = {
            "world": str(task_world.root),
            "build": task_world.info()["figures"],
            "load": clock.lap(),  # the world's load (or build, when not cached yet)
            "methods": task_rows,
        }
        for name, method in family.rows(task, quick).items():
            clock = Clock()
            log(f"[{task}] {name} ...")
            row = method(task_world, settings)
            row.update(clock.lap())
            task_rows[name] = row
            log(f"[{task}] {name}: {format_row(row)} ({format_time(row)})")
    results["seconds"] = round(time.perf_counter() - started, 3)
    results["cpu_seconds"] = round(cpu_seconds() - started_cpu, 3)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    write_manifest(
        out_dir, "demo", {"world": family.name, "quick": quick, "tasks": list(results["tasks"])}
    )
    from prefalign.report import write_demo_report, write_run_report

    table = write_demo_report(results, out_dir)
    write_run_report(out_dir)  # report.md with every plot, and a self-contained report.html
    print(table)
    log(
        f"wrote {out_dir / 'results.json'}, {out_dir / 'report.md'} and plots "
        f"in {format_time(results)}"
    )
    return results


def checked_tasks(
    family: WorldFamily, tasks: list[str] | None, worlds: dict[str, World] | None
) -> list[str]:
    """The tasks to run (None: the family's), each one the family has (or a world given for
    it): checked before any world is loaded, since loading builds a missing one."""
    if tasks is None:
        return list(family.tasks)
    if not tasks:
        raise WorldError("--tasks names no task")
    known = [*family.tasks, *(t for t in worlds or {} if t not in family.tasks)]
    for task in tasks:
        if task not in known:
            raise WorldError(
                f"unknown task {task!r} of the {family.name} demo, allowed: {', '.join(known)}"
            )
    return tasks


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished children (discovery's
    confined workers train in child processes)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


class Clock:
    """Wall and CPU seconds since it was made: a row's cost on a loaded machine is its CPU
    time; its wall time is what it costs alone only when the machine is idle."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), cpu_seconds()

    def lap(self) -> dict[str, float]:
        # To the millisecond: a fast row (a tiny model on an idle machine) must not read 0.
        return {
            "seconds": round(time.perf_counter() - self.wall, 3),
            "cpu_seconds": round(cpu_seconds() - self.cpu, 3),
        }


def format_time(row: dict) -> str:
    return f"wall {row['seconds']:.0f} s, CPU {row['cpu_seconds']:.0f} s"
