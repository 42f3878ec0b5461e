"""How much of the SmolLM2 sentiment world's gold-reward variance lies between prompts.

    PREFALIGN_CACHE=... python bench/smol_variance.py

The world's KTO file holds SmolLM2's own samples, 4 per pair prompt, each with its VADER score.
A one-way variance decomposition (unbiased within-prompt variance) says whether a second sample
of an evaluation prompt is worth about as much as a new prompt (a small between-prompt share)
or much less (a large one).
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict

from prefalign.io import read_jsonl
from prefalign.smol.world import get_smol_world


def main() -> None:
    world = get_smol_world("sentiment")
    by_prompt: dict[str, list[float]] = defaultdict(list)
    for row in read_jsonl(world.file("unpaired.jsonl")):
        by_prompt[row["prompt"]].append(row["reward"])
    groups = [rewards for rewards in by_prompt.values() if len(rewards) > 1]
    total = statistics.variance([r for g in groups for r in g])
    within = statistics.mean(statistics.variance(g) for g in groups)
    print(
        json.dumps(
            {
                "prompts": len(groups),
                "samples": sum(len(g) for g in groups),
                "total_variance": round(total, 4),
                "within_prompt_variance": round(within, 4),
                "between_prompt_share": round(max(0.0, 1 - within / total), 3),
            }
        )
    )


if __name__ == "__main__":
    main()
