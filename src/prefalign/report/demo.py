"""The demo's own summary: its results table and one reward-vs-KL plot per task (report.md)."""

from __future__ import annotations

from pathlib import Path

from prefalign.report.blocks import COLUMNS, fmt
from prefalign.report.plots import Curve, draw_frontier


def format_band(row: dict, key: str) -> str:
    """'0.541-0.566 (3 seeds)', or '' for a row of one seed."""
    band = row.get(f"{key}_band")
    if not band or len(row.get("seeds", ())) < 2:
        return ""
    return f"{band[0]:.3f}-{band[1]:.3f} ({len(row['seeds'])} seeds)"


def world_label(results: dict) -> str:
    """What the demo's worlds are called: the family's label ("Toy", "SmolLM2-135M-Instruct
    (...)"), or its name for results written before families had labels."""
    return str(results.get("world_label") or str(results.get("world", "toy")).capitalize())


def total_time(results: dict) -> str:
    """'Total time: 1234 s wall, 2100 s CPU (2 threads)', with ' (--quick)' for a quick run."""
    text = f"Total time: {results['seconds']:.0f} s wall"
    if isinstance(results.get("cpu_seconds"), (int, float)):
        text += f", {results['cpu_seconds']:.0f} s CPU"
        if results.get("threads"):
            text += f" ({results['threads']} threads)"
    return text + (" (--quick)" if results.get("quick") else "")


def results_table(results: dict) -> str:
    """A Markdown table with one row per (task, method)."""
    bands = ("gold band over seeds", "kl band over seeds")
    header = "| task | method | " + " | ".join(COLUMNS + bands) + " |"
    lines = [header, "|---|---|" + "---|" * (len(COLUMNS) + len(bands))]
    for task, block in results["tasks"].items():
        for name, row in block["methods"].items():
            cells = [fmt(row.get(c)) for c in COLUMNS]
            cells += [format_band(row, "gold_reward") or "1 seed", format_band(row, "kl")]
            lines.append(f"| {task} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_reward_vs_kl(results: dict, task: str, path: Path) -> Path:
    """Gold reward against KL to the SFT policy, one point (or curve, for sweeps) per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = []
    for name, row in results["tasks"][task]["methods"].items():
        points = row.get("sweep") or [row]
        se = None if row.get("sweep") else [row.get("gold_reward_se", 0.0)]
        curves.append(
            Curve(name, [p["kl"] for p in points], [p["gold_reward"] for p in points], se)
        )
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    draw_frontier(ax, curves)
    ax.set_title(f"{task}: gold reward against drift from the SFT policy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_demo_report(results: dict, out_dir: Path) -> str:
    table = results_table(results)
    lines = [
        "# prefalign demo",
        "",
        total_time(results),
        "",
        table,
        "",
    ]
    family = world_label(results)
    for task, block in results["tasks"].items():
        plot = plot_reward_vs_kl(results, task, out_dir / f"{task}_reward_vs_kl.png")
        build = block.get("build", {})
        lines += [
            f"## {task}",
            "",
            f"{family} world: {block.get('world')} ({build.get('parameters', '?')} parameters, "
            f"built in {build.get('build_seconds', '?')} s)",
            "",
            f"![{task}]({plot.name})",
            "",
        ]
    (out_dir / "report.md").write_text("\n".join(lines))
    return table
