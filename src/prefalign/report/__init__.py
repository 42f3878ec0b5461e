"""Reports of run directories: report.md and a self-contained report.html with their plots.

`write_run_report(run_dir)` reports whatever the directory holds, rebuilt from saved files
without rerunning anything; its run.json (`prefalign.manifest`) says what kind of run it is:

    results.json (the demo)           tables; gold reward against KL per task, one curve per
                                      method; alpha sweeps and reward trade-offs
    metrics.jsonl (any training run)  training curves; eval/gold_reward against eval/kl
    *.jsonl with "grow_step"          ReST per-step curves
    *.jsonl with "alpha" / "alphas"   GenARM sweeps (a frontier too when they carry kl)
    *.jsonl with "fitness", "valid"   the discovery leaderboard
    *.png                             shown as they are

Nested runs (the demo's runs/TASK/METHOD/) are found a few levels down. New plots go to
`report_plots/`; report.html embeds every image as a base64 data URI and carries its CSS
inline, so the one file is the whole report. `merge_reports` puts several runs in one report
with shared frontiers; `report_cli` is `prefalign report RUN_DIR... [--out DIR]`.

The package: blocks.py (Markdown/HTML blocks), plots.py (PNG plots, the frontier), scan.py
(what a directory holds), sections.py (one section per kind of file), demo.py (the demo's table).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from prefalign.config import ConfigError
from prefalign.report.blocks import (
    COLUMNS,
    Block,
    Heading,
    Image,
    Table,
    Text,
    fmt,
    to_html,
    to_markdown,
)
from prefalign.report.demo import plot_reward_vs_kl, results_table, write_demo_report
from prefalign.report.plots import Curve, Plotter, draw_frontier, frontier_plot
from prefalign.report.scan import PLOT_DIR, RunContents, classify, scan_run
from prefalign.report.sections import dedupe_steps, demo_curves, is_number, run_blocks, short_label

__all__ = [
    "COLUMNS",
    "PLOT_DIR",
    "Block",
    "Curve",
    "Heading",
    "Image",
    "Plotter",
    "RunContents",
    "Table",
    "Text",
    "classify",
    "demo_curves",
    "draw_frontier",
    "fmt",
    "frontier_plot",
    "merge_reports",
    "plot_reward_vs_kl",
    "report_cli",
    "results_table",
    "scan_run",
    "to_html",
    "to_markdown",
    "write_demo_report",
    "write_run_report",
]


def write_report(out_dir: Path, title: str, blocks: Sequence[Block]) -> tuple[Path, Path]:
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    md_path.write_text(to_markdown(title, blocks, out_dir))
    html_path.write_text(to_html(title, blocks))
    return md_path, html_path


def write_run_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write RUN_DIR/report.md and RUN_DIR/report.html (plots in RUN_DIR/report_plots/)."""
    run_dir = Path(run_dir)
    found = scan_run(run_dir)
    blocks = run_blocks(found, Plotter(run_dir / PLOT_DIR))
    if found.results is not None:
        title = "prefalign demo"
    else:
        kind = f"{found.kind} " if found.kind else ""
        title = f"prefalign {kind}run: {run_dir.resolve().name}"
    return write_report(run_dir, title, blocks)


def merge_reports(run_dirs: Sequence[str | Path], out_dir: str | Path) -> tuple[Path, Path]:
    """One report of several runs: shared frontiers per task first, then each run's sections."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    found = [scan_run(d) for d in run_dirs]
    names = [run_name(f.root) for f in found]
    blocks: list[Block] = [
        Text("Runs: " + ", ".join(f"{n} ({f.root})" for n, f in zip(names, found, strict=True)))
    ]
    shared = Plotter(out_dir / PLOT_DIR, "merged_")
    by_task: dict[str, list[Curve]] = {}
    for name, f in zip(names, found, strict=True):
        for task, block in (f.results or {}).get("tasks", {}).items():
            for c in demo_curves(block.get("methods", {})):
                by_task.setdefault(task, []).append(Curve(f"{name}: {c.label}", c.kl, c.gold, c.se))
        for label, records in f.training.items():
            pts = [
                r
                for r in dedupe_steps(records)
                if is_number(r.get("eval/kl")) and is_number(r.get("eval/gold_reward"))
            ]
            if pts:
                by_task.setdefault("training runs", []).append(
                    Curve(
                        f"{name}: {short_label(label)}",
                        [r["eval/kl"] for r in pts],
                        [r["eval/gold_reward"] for r in pts],
                    )
                )
    if by_task:
        blocks.append(Heading("Gold reward against KL, all runs"))
        for task, curves in by_task.items():
            slug = "".join(ch if ch.isalnum() else "_" for ch in task)
            blocks.append(
                frontier_plot(
                    shared,
                    f"{slug}_reward_vs_kl",
                    curves,
                    f"{task}: gold reward against KL, one curve per run and method",
                )
            )
    for i, (name, f) in enumerate(zip(names, found, strict=True)):
        blocks.append(Heading(f"Run {name}"))
        for b in run_blocks(f, Plotter(out_dir / PLOT_DIR, f"run{i}_")):
            blocks.append(Heading(b.text, min(b.level + 1, 6)) if isinstance(b, Heading) else b)
    return write_report(out_dir, "prefalign report", blocks)


def run_name(path: Path) -> str:
    return path.resolve().name or str(path)


def report_cli(args: argparse.Namespace) -> int:
    """`prefalign report RUN_DIR... [--out DIR]`: rebuild each run's report in place; with
    several runs or --out, also merge them into one report in --out (default prefalign_report)."""
    run_dirs = [Path(d) for d in args.run_dirs]
    if not run_dirs:
        raise ConfigError("report: give at least one run directory")
    for d in run_dirs:
        if not d.is_dir():
            raise FileNotFoundError(f"report: no such run directory: {d}")
    for d in run_dirs:
        md, page = write_run_report(d)
        print(f"wrote {md} and {page}")
    out = getattr(args, "out", None)
    if out or len(run_dirs) > 1:
        md, page = merge_reports(run_dirs, Path(out or "prefalign_report"))
        print(f"wrote {md} and {page}")
    return 0
