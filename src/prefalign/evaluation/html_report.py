"""Reports of run directories: report.md and a self-contained report.html with their plots.

`write_run_report(run_dir)` reports whatever the directory holds, rebuilt from saved files
without rerunning anything:

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
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefalign.evaluation.report import COLUMNS, fmt
from prefalign.io import flatten, iter_jsonl

PLOT_DIR = "report_plots"
SKIP_DIRS = {"checkpoints", "final", PLOT_DIR, "__pycache__"}
MAX_DEPTH = 6  # e.g. DEMO/runs/arith/rest/improve/g000_i00/metrics.jsonl
MAX_JSONL_BYTES = 50_000_000  # larger files are data, not metrics
TRAINING_PANELS = ("loss", "rewards/margins", "rewards/accuracies", "eval/gold_reward", "eval/kl")
SWEEP_KEYS = ("alpha", "alphas")
SAMPLE_KEYS = {"prompt", "response", "completion", "chosen", "rejected"}  # data files, not metrics
REST_KINDS = {"initial", "grow", "improve"}
# The ReST columns worth a table and a curve, when the records have them (prefalign rest).
REST_COLUMNS = (
    "threshold", "kept_fraction", "reward/mean", "gold_reward/mean", "eval/reward", "eval/gold_reward",
    "eval/accuracy", "eval/kl", "loss_last",
)
LEADERBOARD_ROWS = 20


# --- the report's building blocks, rendered to Markdown and to HTML -------------------------


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Text:
    text: str


@dataclass
class Table:
    headers: list[str]
    rows: list[list[Any]]


@dataclass
class Image:
    path: Path
    caption: str


Block = Heading | Text | Table | Image


def to_markdown(title: str, blocks: Sequence[Block], base: Path) -> str:
    """Markdown with images linked relative to `base` (the directory of report.md)."""
    lines = [f"# {title}", ""]
    for b in blocks:
        if isinstance(b, Heading):
            lines += ["#" * b.level + " " + b.text, ""]
        elif isinstance(b, Text):
            lines += [b.text, ""]
        elif isinstance(b, Table):
            lines.append("| " + " | ".join(b.headers) + " |")
            lines.append("|" + "---|" * len(b.headers))
            lines += ["| " + " | ".join(_cell(c).replace("|", "\\|") for c in row) + " |" for row in b.rows]
            lines.append("")
        else:
            lines += [f"![{b.caption}]({Path(os.path.relpath(b.path, base)).as_posix()})", ""]
    return "\n".join(lines)


CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 72rem; padding: 0 1rem; color: #222; }
h1 { border-bottom: 2px solid #ddd; } h2 { border-bottom: 1px solid #eee; margin-top: 2.2rem; }
table { border-collapse: collapse; margin: 0.8rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
figure { margin: 1rem 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.85rem; } .meta { color: #777; font-size: 0.85rem; }
"""


def to_html(title: str, blocks: Sequence[Block]) -> str:
    """One self-contained page: inline CSS, images as data URIs, no scripts, no links out."""
    esc = html.escape
    body = [f"<h1>{esc(title)}</h1>", f'<p class="meta">generated {time.strftime("%Y-%m-%d %H:%M:%S")}</p>']
    for b in blocks:
        if isinstance(b, Heading):
            body.append(f"<h{b.level}>{esc(b.text)}</h{b.level}>")
        elif isinstance(b, Text):
            body.append(f"<p>{esc(b.text)}</p>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{esc(h)}</th>" for h in b.headers)
            rows = "".join("<tr>" + "".join(f"<td>{esc(_cell(c))}</td>" for c in row) + "</tr>" for row in b.rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        else:
            data = base64.b64encode(b.path.read_bytes()).decode("ascii")
            body.append(
                f'<figure><img alt="{esc(b.caption)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{esc(b.caption)}</figcaption></figure>"
            )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def _cell(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(_cell(v) for v in value)
    return fmt(value)


# --- what a run directory holds -------------------------------------------------------------


@dataclass
class RunContents:
    root: Path
    results: dict | None = None  # the demo's results.json
    training: dict[str, list[dict]] = field(default_factory=dict)  # label -> metrics records
    rest: dict[str, list[dict]] = field(default_factory=dict)
    sweeps: dict[str, list[dict]] = field(default_factory=dict)
    archives: dict[str, list[dict]] = field(default_factory=dict)
    images: list[Path] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.results or self.training or self.rest or self.sweeps or self.archives or self.images)


def scan_run(run_dir: str | Path) -> RunContents:
    """Find and classify every metrics file and image under `run_dir` (checkpoints skipped)."""
    root = Path(run_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"report: no such run directory: {root}")
    found = RunContents(root)
    for path in _walk(root):
        label = path.relative_to(root).as_posix()
        if path.suffix == ".png":
            found.images.append(path)
        elif path.name == "results.json" and path.parent == root:
            data = _read_json(path)
            if isinstance(data, dict) and isinstance(data.get("tasks"), dict):
                found.results = data
        elif path.suffix == ".jsonl" and path.stat().st_size <= MAX_JSONL_BYTES:
            records = read_jsonl(path)
            kind = classify(records)
            if kind is not None:
                getattr(found, kind)[label] = records
    return found


def _walk(root: Path) -> Iterable[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        depth = len(Path(dirpath).relative_to(root).parts)
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".") and depth < MAX_DEPTH)
        for name in sorted(filenames):
            yield Path(dirpath) / name


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a JSON-lines file; torn or foreign lines are skipped."""
    return [r for _, r in iter_jsonl(path, errors="yield") if isinstance(r, dict)]


def classify(records: Sequence[dict]) -> str | None:
    """Which report section a JSON-lines file feeds, from the keys of its records."""
    keys = set().union(*(r.keys() for r in records[:50])) if records else set()
    if keys & SAMPLE_KEYS:
        return None  # samples (ReST's grown/*.jsonl, preference data), not metrics
    if {"fitness", "valid"} <= keys:
        return "archives"
    kinds = {r.get("kind") for r in records[:50]}
    if "grow_step" in keys or ("grow" in keys and kinds <= REST_KINDS):
        return "rest"
    if keys & set(SWEEP_KEYS):
        return "sweeps"
    if "step" in keys and ("loss" in keys or any(k.startswith("eval/") for k in keys)):
        return "training"
    return None


# --- sections ---------------------------------------------------------------------------------


@dataclass
class Curve:
    """Gold reward against KL: one point, or a curve (a sweep, or evaluations during training)."""

    label: str
    kl: list[float]
    gold: list[float]
    se: list[float] | None = None


class Plotter:
    """Writes numbered PNGs into one directory, so merged reports never overwrite each other."""

    def __init__(self, out_dir: Path, prefix: str = "") -> None:
        self.out_dir = out_dir
        self.prefix = prefix

    def save(self, name: str, draw: Callable[[Any], None], caption: str, width: float = 4.6) -> Image:
        """One plot: `draw(ax)` fills a single axes."""
        return self.save_grid(name, ["_"], lambda ax, _: draw(ax), caption, width)

    def save_grid(
        self, name: str, keys: Sequence[str], draw: Callable[[Any, str], None], caption: str, width: float = 4.6
    ) -> Image:
        """Small multiples: `draw(ax, key)` fills one panel per key (`width` inches), three to a row."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        cols = min(len(keys), 3)
        rows = math.ceil(len(keys) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(width * cols, 3.6 * rows), squeeze=False)
        for ax, key in zip(axes.flat, keys, strict=False):
            draw(ax, key)
        for ax in list(axes.flat)[len(keys):]:
            ax.set_visible(False)
        fig.tight_layout()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"{self.prefix}{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return Image(path, caption)


def run_blocks(found: RunContents, plots: Plotter) -> list[Block]:
    """Every section the run's files support, in a fixed order."""
    blocks: list[Block] = []
    if found.results is not None:
        blocks += demo_blocks(found.results, plots, found.root)
    if found.training:
        blocks += training_blocks(found.training, plots)
    if found.rest:
        blocks += rest_blocks(found.rest, plots, found.root)
    if found.sweeps:
        blocks += sweep_blocks(found.sweeps, plots)
    if found.archives:
        blocks += archive_blocks(found.archives, plots)
    shown = {b.path.resolve() for b in blocks if isinstance(b, Image)}
    if found.results is not None:  # the demo's own frontier plots, redrawn above
        shown |= {(found.root / f"{task}_reward_vs_kl.png").resolve() for task in found.results["tasks"]}
    others = [p for p in found.images if p.resolve() not in shown]
    if others:
        blocks.append(Heading("Other plots"))
        blocks += [Image(p, p.relative_to(found.root).as_posix()) for p in others]
    if not blocks:
        blocks.append(Text(
            f"Nothing to report in {found.root}: no results.json, metrics.jsonl, ReST or sweep "
            "JSON lines, discovery archive or PNG plots."
        ))
    return blocks


def demo_blocks(results: dict, plots: Plotter, root: Path | None = None) -> list[Block]:
    seconds = results.get("seconds")
    quick = " (--quick)" if results.get("quick") else ""
    blocks: list[Block] = [Heading("Results")]
    if isinstance(seconds, (int, float)):
        blocks.append(Text(f"Total time: {seconds:.0f} s{quick}"))
    rows = [
        [task, name, *[row.get(c) for c in COLUMNS]]
        for task, block in results["tasks"].items()
        for name, row in block.get("methods", {}).items()
    ]
    blocks.append(Table(["task", "method", *COLUMNS], rows))
    for task, block in results["tasks"].items():
        methods = block.get("methods", {})
        blocks.append(Heading(f"{task}: gold reward against KL"))
        build = block.get("build") or {}
        if block.get("world"):
            blocks.append(Text(f"Toy world: {block['world']} ({build.get('parameters', '?')} parameters)"))
        curves = demo_curves(methods)
        if curves:
            blocks.append(frontier_plot(plots, f"{task}_reward_vs_kl", curves, f"{task}: gold reward against KL(policy || SFT), one curve per method"))
        for name, row in methods.items():
            extra = method_blocks(plots, root, task, name, row)
            if extra:
                blocks += [Heading(f"{task} / {name}", 3), *extra]
    return blocks


def method_blocks(plots: Plotter, root: Path | None, task: str, name: str, row: dict) -> list[Block]:
    """A demo row's own figures (PNG paths in the row, or NAME_alpha_sweep.png and
    NAME_tradeoff.png beside results.json); what is missing is drawn from the row's data."""
    own = [p for p in (_existing_png(v, root) for v in _flatten(row).values()) if p is not None]
    blocks: list[Block] = [Image(p, f"{task} / {name}: {p.name}") for p in own]
    sweep = row.get("sweep") or []
    if sweep and isinstance(sweep[0], dict) and any(k in sweep[0] for k in SWEEP_KEYS):
        saved = root / f"{name}_alpha_sweep.png" if root is not None else None
        if saved is not None and saved.is_file():
            blocks += [Table(*_sweep_table(sweep)), Image(saved, f"{task} / {name}: alpha sweep")]
        else:
            blocks += sweep_plots(plots, f"{task}_{name}", f"{task} / {name}", sweep)
    tradeoff = row.get("tradeoff") or []
    if tradeoff and isinstance(tradeoff[0], dict):
        saved = root / f"{name}_tradeoff.png" if root is not None else None
        if saved is not None and saved.is_file():
            blocks.append(Image(saved, f"{task} / {name}: trade-off"))
        else:
            blocks += tradeoff_blocks(plots, f"{task}_{name}", f"{task} / {name}", tradeoff)
    return blocks


def _existing_png(value: Any, root: Path | None) -> Path | None:
    if not (isinstance(value, str) and value.endswith(".png")):
        return None
    path = Path(value)
    if not path.is_absolute() and root is not None:
        path = path if path.is_file() else root / path
    return path if path.is_file() else None


def demo_curves(methods: dict) -> list[Curve]:
    curves = []
    for name, row in methods.items():
        points = sorted(row.get("sweep") or [row], key=lambda p: p.get("kl", 0.0))
        points = [p for p in points if _number(p.get("kl")) and _number(p.get("gold_reward"))]
        if points:
            se = [p.get("gold_reward_se") or 0.0 for p in points]
            curves.append(Curve(name, [p["kl"] for p in points], [p["gold_reward"] for p in points], se))
    return curves


def frontier_plot(plots: Plotter, name: str, curves: Sequence[Curve], caption: str) -> Image:
    width = 6.6 if len(curves) > 6 else 4.6  # room for the legend beside the axes
    return plots.save(name, lambda ax: draw_frontier(ax, curves), caption, width)


def draw_frontier(ax: Any, curves: Sequence[Curve]) -> None:
    """Gold reward against KL, a distinct colour and marker per method; the KL axis turns
    logarithmic beyond 10 nats, so a far-drifting sweep does not squeeze the rest into a corner."""
    import matplotlib
    import matplotlib.ticker

    colors = matplotlib.colormaps["tab20"].colors
    markers = "osD^vP*Xh<>"
    for i, c in enumerate(curves):
        style = dict(color=colors[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20], marker=markers[i % len(markers)], label=c.label)
        if len(c.kl) == 1:
            ax.errorbar(c.kl, c.gold, yerr=c.se or None, capsize=3, **style)
        else:
            ax.plot(c.kl, c.gold, **style)
    widest = max((k for c in curves for k in c.kl), default=0.0)
    if widest > 10:
        ax.set_xscale("symlog", linthresh=10, linscale=2)
        ax.set_xticks([t for t in (0, 2, 4, 6, 8, 10, 20, 50, 100, 200, 500) if t <= widest * 1.2])
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("KL(policy || SFT) per sequence (nats)")
    ax.set_ylabel("gold reward")
    ax.grid(alpha=0.3)
    if len(curves) > 6:  # beside the axes: inside, a dozen entries hide the points
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    else:
        ax.legend(fontsize=7)


def training_blocks(runs: dict[str, list[dict]], plots: Plotter) -> list[Block]:
    runs = {label: dedupe_steps(records) for label, records in runs.items()}
    blocks: list[Block] = [Heading("Training")]
    keys = [k for k in TRAINING_PANELS if any(k in r for rs in runs.values() for r in rs)]
    rows = []
    for label, records in runs.items():
        last = {k: _last(records, k) for k in keys}
        rows.append([label, records[-1].get("step") if records else None, *last.values()])
    blocks.append(Table(["run", "steps", *(f"last {k}" for k in keys)], rows))

    def draw(ax: Any, key: str) -> None:
        for label, records in runs.items():
            pts = [(r["step"], r[key]) for r in records if _number(r.get(key))]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 30 else None, label=_short(label))
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if key == keys[0] and len(runs) <= 12:
            ax.legend(fontsize=7)

    if keys:
        blocks.append(plots.save_grid("training_curves", keys, draw, "training curves, one line per run"))
    curves = [
        Curve(_short(label), [r["eval/kl"] for r in rs], [r["eval/gold_reward"] for r in rs])
        for label, records in runs.items()
        if (rs := [r for r in records if _number(r.get("eval/kl")) and _number(r.get("eval/gold_reward"))])
    ]
    if curves:
        blocks.append(frontier_plot(plots, "training_reward_vs_kl", curves, "eval/gold_reward against eval/kl during training, one curve per run"))
    return blocks


def dedupe_steps(records: Sequence[dict]) -> list[dict]:
    """One record per step, the last written (a resumed run logs some steps again)."""
    by_step: dict[Any, dict] = {}
    for r in records:
        if "step" in r:
            by_step[r["step"]] = {**by_step.get(r["step"], {}), **r}
    return sorted(by_step.values(), key=lambda r: r["step"])


def rest_blocks(runs: dict[str, list[dict]], plots: Plotter, root: Path) -> list[Block]:
    blocks: list[Block] = [Heading("ReST: per step")]
    for i, (label, records) in enumerate(runs.items()):
        flat = [_flatten(r) for r in records]
        steps = [rest_step_label(r) for r in flat]
        keys = [k for k in REST_COLUMNS if any(k in r for r in flat)] or _numeric_keys(flat, exclude={"grow_step", "step", "grow", "improve"})
        blocks.append(Heading(label, 3))
        blocks.append(Table(["step", *keys], [[step, *(r.get(k) for k in keys)] for step, r in zip(steps, flat, strict=True)]))
        own = (root / label).parent / "steps.png"  # prefalign rest draws its own per-step figure
        if own.is_file():
            blocks.append(Image(own, f"ReST per-step curves: {own.relative_to(root).as_posix()}"))
            continue

        def draw(ax: Any, key: str, flat: list[dict] = flat, steps: list[str] = steps) -> None:
            pts = [(x, r[key]) for x, r in enumerate(flat) if _number(r.get(key))]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
            ax.set_xticks(range(len(steps)), steps, fontsize=7, rotation=45)
            ax.set_title(key)
            ax.grid(alpha=0.3)

        if keys:
            blocks.append(plots.save_grid(f"rest_{i}", keys[:9], draw, f"ReST per-step curves: {label}"))
    return blocks


def rest_step_label(record: dict) -> str:
    """init, G{grow} or I{grow}.{improve} for prefalign rest records; else the grow_step."""
    kind = record.get("kind")
    if kind == "initial":
        return "init"
    if kind == "grow":
        return f"G{record.get('grow')}"
    if kind == "improve":
        return f"I{record.get('grow')}.{record.get('improve')}"
    return _cell(record.get("grow_step", "?"))


def sweep_blocks(runs: dict[str, list[dict]], plots: Plotter) -> list[Block]:
    blocks: list[Block] = [Heading("Sweeps")]
    curves = []
    for i, (label, records) in enumerate(runs.items()):
        blocks.append(Heading(label, 3))
        blocks += sweep_plots(plots, f"sweep_{i}", label, records)
        pts = sorted((r for r in records if _number(r.get("kl")) and _number(r.get("gold_reward"))), key=lambda r: r["kl"])
        if pts:
            curves.append(Curve(_short(label), [r["kl"] for r in pts], [r["gold_reward"] for r in pts]))
    if curves:
        blocks.append(frontier_plot(plots, "sweeps_reward_vs_kl", curves, "gold reward against KL of the sweeps, one curve per sweep"))
    return blocks


def sweep_plots(plots: Plotter, name: str, label: str, records: Sequence[dict]) -> list[Block]:
    """A table, metrics against a scalar alpha, and the trade-off between the first two rewards."""
    flat = [_flatten(r) for r in records]
    headers, rows = _sweep_table(records)
    param, keys = headers[0], headers[1:]
    blocks: list[Block] = [Table(headers, rows)]
    scalar = [r for r in flat if _number(r.get(param))]
    shown = [k for k in keys if not k.endswith("_se")][:6]
    if scalar and shown:
        scalar.sort(key=lambda r: r[param])

        def draw(ax: Any, key: str) -> None:
            pts = [(r[param], r[key]) for r in scalar if _number(r.get(key))]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
            ax.set_title(key)
            ax.set_xlabel(param)
            ax.grid(alpha=0.3)

        blocks.append(plots.save_grid(f"{name}_{param}_sweep", shown, draw, f"{label}: metrics against {param}"))
    rewards = [k for k in keys if _is_reward(k)]
    if len(rewards) >= 2:
        y, x = (rewards[0], rewards[1]) if rewards[0] == "gold_reward" else (rewards[1], rewards[0])

        def draw_tradeoff(ax: Any) -> None:
            pts = [r for r in flat if _number(r.get(x)) and _number(r.get(y))]
            ax.plot([r[x] for r in pts], [r[y] for r in pts], marker="o")
            for r in pts:
                ax.annotate(_cell(r.get(param)), (r[x], r[y]), fontsize=7, xytext=(3, 3), textcoords="offset points")
            ax.set_xlabel(x)
            ax.set_ylabel(y)
            ax.grid(alpha=0.3)

        blocks.append(plots.save(f"{name}_tradeoff", draw_tradeoff, f"{label}: {y} against {x}, points labelled by {param}"))
    return blocks


def _sweep_table(records: Sequence[dict]) -> tuple[list[str], list[list[Any]]]:
    flat = [_flatten(r) for r in records]
    param = next(k for k in SWEEP_KEYS if any(k in r for r in flat))
    keys = _numeric_keys(flat, exclude={param, "seconds"})
    return [param, *keys], [[r.get(param), *(r.get(k) for k in keys)] for r in flat]


def tradeoff_blocks(plots: Plotter, name: str, label: str, points: Sequence[dict]) -> list[Block]:
    """Two objectives traded by a weight vector: the first two metrics against each other."""
    flat = [_flatten(p) for p in points]
    weight = next((k for k in ("weights", *SWEEP_KEYS) if any(k in p for p in flat)), None)
    metrics = [k for k in _numeric_keys(flat, exclude={"kl", "seconds"}) if not k.endswith("_se")]
    columns = metrics + (["kl"] if any("kl" in p for p in flat) else [])
    rows = [[p.get(weight) if weight else i, *(p.get(c) for c in columns)] for i, p in enumerate(flat)]
    blocks: list[Block] = [Table([weight or "#", *columns], rows)]
    if len(metrics) >= 2:
        y, x = metrics[0], metrics[1]

        def draw(ax: Any) -> None:
            pts = [p for p in flat if _number(p.get(x)) and _number(p.get(y))]
            ax.plot([p[x] for p in pts], [p[y] for p in pts], marker="o")
            for p in pts:
                ax.annotate(_cell(p.get(weight)) if weight else "", (p[x], p[y]), fontsize=7, xytext=(3, 3), textcoords="offset points")
            ax.set_xlabel(x)
            ax.set_ylabel(y)
            ax.grid(alpha=0.3)

        blocks.append(plots.save(f"{name}_tradeoff", draw, f"{label}: {y} against {x}" + (f", points labelled by {weight}" if weight else "")))
    return blocks


def archive_blocks(archives: dict[str, list[dict]], plots: Plotter) -> list[Block]:
    blocks: list[Block] = [Heading("Discovery leaderboard")]
    for i, (label, records) in enumerate(archives.items()):
        valid = [r for r in records if r.get("valid") and _number(r.get("fitness"))]
        best: dict[Any, dict] = {}
        for r in valid:  # one row per distinct objective: its best score
            key = r.get("code_hash") or r.get("name")
            if key not in best or r["fitness"] > best[key]["fitness"]:
                best[key] = r
        ranked = sorted(best.values(), key=lambda r: r["fitness"], reverse=True)[:LEADERBOARD_ROWS]
        invalid = [r for r in records if not r.get("valid")]
        blocks.append(Heading(label, 3))
        blocks.append(Text(f"{len(records)} proposals, {len(valid)} valid, {len(invalid)} rejected."))
        table = [[k + 1, r.get("name"), r.get("generation"), r.get("fitness"), r.get("valid"), r.get("reason") or ""] for k, r in enumerate(ranked)]
        table += [["-", r.get("name"), r.get("generation"), r.get("fitness"), r.get("valid"), _short(str(r.get("reason") or ""), 120)] for r in invalid[:10]]
        blocks.append(Table(["rank", "name", "generation", "fitness", "valid", "reason"], table))
        gens = sorted({r["generation"] for r in valid if _number(r.get("generation"))})
        if gens:

            def draw(ax: Any, valid: list[dict] = valid, gens: list = gens) -> None:
                ax.scatter([r["generation"] for r in valid if _number(r.get("generation"))],
                           [r["fitness"] for r in valid if _number(r.get("generation"))], s=12, alpha=0.5, label="proposals")
                running, best_so_far = [], -math.inf
                for g in gens:
                    best_so_far = max(best_so_far, max(r["fitness"] for r in valid if r.get("generation") == g))
                    running.append(best_so_far)
                ax.step(gens, running, where="post", color="C3", label="best so far")
                ax.set_xlabel("generation")
                ax.set_ylabel("fitness")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7)

            blocks.append(plots.save(f"discovery_{i}", draw, f"discovery fitness by generation: {label}"))
    return blocks


# --- helpers ------------------------------------------------------------------------------------


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _numeric_keys(records: Sequence[dict], exclude: set[str]) -> list[str]:
    keys: dict[str, None] = {}
    for r in records:
        for k, v in r.items():
            if k not in exclude and _number(v):
                keys[k] = None
    return list(keys)


def _flatten(record: dict) -> dict:
    """{"extra_rewards": {"brevity": 1}} -> {"extra_rewards/brevity": 1}."""
    return flatten(record, sep="/")


def _is_reward(key: str) -> bool:
    return "reward" in key and not key.endswith("_se")


def _last(records: Sequence[dict], key: str) -> Any:
    for r in reversed(records):
        if _number(r.get(key)):
            return r[key]
    return None


def _short(text: str, limit: int = 40) -> str:
    text = text.removesuffix("/metrics.jsonl").removesuffix(".jsonl")
    return text if len(text) <= limit else "..." + text[-(limit - 3):]


# --- entry points ------------------------------------------------------------------------------


def _write(out_dir: Path, title: str, blocks: Sequence[Block]) -> tuple[Path, Path]:
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    md_path.write_text(to_markdown(title, blocks, out_dir))
    html_path.write_text(to_html(title, blocks))
    return md_path, html_path


def write_run_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write RUN_DIR/report.md and RUN_DIR/report.html (plots in RUN_DIR/report_plots/)."""
    run_dir = Path(run_dir)
    found = scan_run(run_dir)
    blocks = run_blocks(found, Plotter(run_dir / PLOT_DIR))
    title = "prefalign demo" if found.results is not None else f"prefalign run: {run_dir.resolve().name}"
    return _write(run_dir, title, blocks)


def merge_reports(run_dirs: Sequence[str | Path], out_dir: str | Path) -> tuple[Path, Path]:
    """One report of several runs: shared frontiers per task first, then each run's sections."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    found = [scan_run(d) for d in run_dirs]
    names = [_run_name(f.root) for f in found]
    blocks: list[Block] = [Text("Runs: " + ", ".join(f"{n} ({f.root})" for n, f in zip(names, found, strict=True)))]
    shared = Plotter(out_dir / PLOT_DIR, "merged_")
    by_task: dict[str, list[Curve]] = {}
    for name, f in zip(names, found, strict=True):
        for task, block in (f.results or {}).get("tasks", {}).items():
            for c in demo_curves(block.get("methods", {})):
                by_task.setdefault(task, []).append(Curve(f"{name}: {c.label}", c.kl, c.gold, c.se))
        for label, records in f.training.items():
            pts = [r for r in dedupe_steps(records) if _number(r.get("eval/kl")) and _number(r.get("eval/gold_reward"))]
            if pts:
                by_task.setdefault("training runs", []).append(Curve(f"{name}: {_short(label)}", [r["eval/kl"] for r in pts], [r["eval/gold_reward"] for r in pts]))
    if by_task:
        blocks.append(Heading("Gold reward against KL, all runs"))
        for task, curves in by_task.items():
            slug = "".join(ch if ch.isalnum() else "_" for ch in task)
            blocks.append(frontier_plot(shared, f"{slug}_reward_vs_kl", curves, f"{task}: gold reward against KL, one curve per run and method"))
    for i, (name, f) in enumerate(zip(names, found, strict=True)):
        blocks.append(Heading(f"Run {name}"))
        for b in run_blocks(f, Plotter(out_dir / PLOT_DIR, f"run{i}_")):
            blocks.append(Heading(b.text, min(b.level + 1, 6)) if isinstance(b, Heading) else b)
    return _write(out_dir, "prefalign report", blocks)


def _run_name(path: Path) -> str:
    return path.resolve().name or str(path)


def report_cli(args: argparse.Namespace) -> int:
    """`prefalign report RUN_DIR... [--out DIR]`: rebuild each run's report in place; with
    several runs or --out, also merge them into one report in --out (default prefalign_report)."""
    run_dirs = [Path(d) for d in args.run_dirs]
    if not run_dirs:
        raise ValueError("report: give at least one run directory")
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
