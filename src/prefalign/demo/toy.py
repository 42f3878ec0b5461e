"""The toy world family of the demo: sentiment and arith, every method that exists."""

from __future__ import annotations

from prefalign.demo.settings import method_sft
from prefalign.demo.worlds import MethodFn, WorldFamily, register_world_family
from prefalign.toy.tasks import world_task
from prefalign.toy.world import get_world


def toy_rows(task: str, quick: bool = False) -> dict[str, MethodFn]:
    """The demo rows of a toy task, in table order."""
    from prefalign.demo.preference import PREFERENCE_ROWS, preference_method
    from prefalign.demo.rest import demo_rest

    rows: dict[str, MethodFn] = {"sft": method_sft}
    if task == "sentiment":
        from prefalign.demo.discovery import demo_discovery
        from prefalign.demo.genarm import demo_genarm

        rows.update({name: preference_method(name, row) for name, row in PREFERENCE_ROWS.items()})
        if not quick:  # discovery trains a dozen candidates: the full demo's row only
            rows["discovered"] = demo_discovery
        rows["genarm"] = demo_genarm
    rows["rest"] = demo_rest
    return rows


TOY = register_world_family(
    WorldFamily(
        name="toy",
        tasks=("sentiment", "arith"),
        load=lambda task, log=print: get_world(task, log=log),
        task_of=world_task,
        rows=toy_rows,
        description="the embedded toy world: a few-million-parameter Llama trained here",
        label="Toy",
        # Off: returning freed buffers cost a dpo row (9 trainings) 6.5x the page faults and
        # 1.13x the CPU time for a 3% lower peak RSS (`bench/smol_row.py dpo --world toy`).
        mmap_threshold_kib=0,
    )
)
