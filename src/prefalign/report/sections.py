"""The sections of a report, each drawn from one kind of saved file: the demo's results, training
metrics, ReST steps, sweeps and the discovery archive."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from prefalign.io import flatten
from prefalign.report.blocks import COLUMNS, Block, Heading, Image, Table, Text, cell_text
from prefalign.report.demo import total_time, world_label
from prefalign.report.plots import Curve, Plotter, frontier_plot
from prefalign.report.scan import SWEEP_KEYS, RunContents

TRAINING_PANELS = ("loss", "rewards/margins", "rewards/accuracies", "eval/gold_reward", "eval/kl")

# The ReST columns worth a table and a curve, when the records have them (prefalign rest).
REST_COLUMNS = (
    "threshold",
    "kept_fraction",
    "reward/mean",
    "gold_reward/mean",
    "eval/reward",
    "eval/gold_reward",
    "eval/accuracy",
    "eval/kl",
    "loss_last",
)

LEADERBOARD_ROWS = 20


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
        shown |= {
            (found.root / f"{task}_reward_vs_kl.png").resolve() for task in found.results["tasks"]
        }
    others = [p for p in found.images if p.resolve() not in shown]
    if others:
        blocks.append(Heading("Other plots"))
        blocks += [Image(p, p.relative_to(found.root).as_posix()) for p in others]
    if not blocks:
        blocks.append(
            Text(
                f"Nothing to report in {found.root}: no results.json, metrics.jsonl, ReST or sweep "
                "JSON lines, discovery archive or PNG plots."
            )
        )
    return blocks


def demo_blocks(results: dict, plots: Plotter, root: Path | None = None) -> list[Block]:
    blocks: list[Block] = [Heading("Results")]
    if isinstance(results.get("seconds"), (int, float)):
        blocks.append(Text(total_time(results)))
    rows = [
        [task, name, *[row.get(c) for c in COLUMNS]]
        for task, block in results["tasks"].items()
        for name, row in block.get("methods", {}).items()
    ]
    blocks.append(Table(["task", "method", *COLUMNS], rows))
    family = world_label(results)
    for task, block in results["tasks"].items():
        methods = block.get("methods", {})
        blocks.append(Heading(f"{task}: gold reward against KL"))
        build = block.get("build") or {}
        if block.get("world"):
            blocks.append(
                Text(
                    f"{family} world: {block['world']} ({build.get('parameters', '?')} parameters)"
                )
            )
        curves = demo_curves(methods)
        if curves:
            blocks.append(
                frontier_plot(
                    plots,
                    f"{task}_reward_vs_kl",
                    curves,
                    f"{task}: gold reward against KL(policy || SFT), one curve per method",
                )
            )
        for name, row in methods.items():
            extra = method_blocks(plots, root, task, name, row)
            if extra:
                blocks += [Heading(f"{task} / {name}", 3), *extra]
    return blocks


def method_blocks(
    plots: Plotter, root: Path | None, task: str, name: str, row: dict
) -> list[Block]:
    """A demo row's own figures (PNG paths in the row, or NAME_alpha_sweep.png and
    NAME_tradeoff.png beside results.json); what is missing is drawn from the row's data."""
    own = [p for p in (existing_png(v, root) for v in flat_record(row).values()) if p is not None]
    blocks: list[Block] = [Image(p, f"{task} / {name}: {p.name}") for p in own]
    sweep = row.get("sweep") or []
    if sweep and isinstance(sweep[0], dict) and any(k in sweep[0] for k in SWEEP_KEYS):
        saved = root / f"{name}_alpha_sweep.png" if root is not None else None
        if saved is not None and saved.is_file():
            blocks += [Table(*sweep_table(sweep)), Image(saved, f"{task} / {name}: alpha sweep")]
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


def existing_png(value: Any, root: Path | None) -> Path | None:
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
        points = [p for p in points if is_number(p.get("kl")) and is_number(p.get("gold_reward"))]
        if points:
            se = [p.get("gold_reward_se") or 0.0 for p in points]
            curves.append(
                Curve(name, [p["kl"] for p in points], [p["gold_reward"] for p in points], se)
            )
    return curves


def training_blocks(runs: dict[str, list[dict]], plots: Plotter) -> list[Block]:
    runs = {label: dedupe_steps(records) for label, records in runs.items()}
    blocks: list[Block] = [Heading("Training")]
    keys = [k for k in TRAINING_PANELS if any(k in r for rs in runs.values() for r in rs)]
    rows = []
    for label, records in runs.items():
        last = {k: last_value(records, k) for k in keys}
        rows.append([label, records[-1].get("step") if records else None, *last.values()])
    blocks.append(Table(["run", "steps", *(f"last {k}" for k in keys)], rows))

    def draw(ax: Any, key: str) -> None:
        for label, records in runs.items():
            pts = [(r["step"], r[key]) for r in records if is_number(r.get(key))]
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker="." if len(pts) < 30 else None,
                label=short_label(label),
            )
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if key == keys[0] and len(runs) <= 12:
            ax.legend(fontsize=7)

    if keys:
        blocks.append(
            plots.save_grid("training_curves", keys, draw, "training curves, one line per run")
        )
    curves = [
        Curve(short_label(label), [r["eval/kl"] for r in rs], [r["eval/gold_reward"] for r in rs])
        for label, records in runs.items()
        if (
            rs := [
                r
                for r in records
                if is_number(r.get("eval/kl")) and is_number(r.get("eval/gold_reward"))
            ]
        )
    ]
    if curves:
        blocks.append(
            frontier_plot(
                plots,
                "training_reward_vs_kl",
                curves,
                "eval/gold_reward against eval/kl during training, one curve per run",
            )
        )
    return blocks


def dedupe_steps(records: Sequence[dict]) -> list[dict]:
    """One record per step, the last written (a resumed run logs some steps again); a record
    whose step is not a number is no step."""
    by_step: dict[Any, dict] = {}
    for r in records:
        if is_number(r.get("step")):
            by_step[r["step"]] = {**by_step.get(r["step"], {}), **r}
    return sorted(by_step.values(), key=lambda r: r["step"])


def rest_blocks(runs: dict[str, list[dict]], plots: Plotter, root: Path) -> list[Block]:
    blocks: list[Block] = [Heading("ReST: per step")]
    for i, (label, records) in enumerate(runs.items()):
        flat = [flat_record(r) for r in records]
        steps = [rest_step_label(r) for r in flat]
        keys = [k for k in REST_COLUMNS if any(k in r for r in flat)] or numeric_keys(
            flat, exclude={"grow_step", "step", "grow", "improve"}
        )
        blocks.append(Heading(label, 3))
        blocks.append(
            Table(
                ["step", *keys],
                [[step, *(r.get(k) for k in keys)] for step, r in zip(steps, flat, strict=True)],
            )
        )
        own = (root / label).parent / "steps.png"  # prefalign rest draws its own per-step figure
        if own.is_file():
            blocks.append(Image(own, f"ReST per-step curves: {own.relative_to(root).as_posix()}"))
            continue

        def draw(ax: Any, key: str, flat: list[dict] = flat, steps: list[str] = steps) -> None:
            pts = [(x, r[key]) for x, r in enumerate(flat) if is_number(r.get(key))]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
            ax.set_xticks(range(len(steps)), steps, fontsize=7, rotation=45)
            ax.set_title(key)
            ax.grid(alpha=0.3)

        if keys:
            blocks.append(
                plots.save_grid(f"rest_{i}", keys[:9], draw, f"ReST per-step curves: {label}")
            )
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
    return cell_text(record.get("grow_step", "?"))


def sweep_blocks(runs: dict[str, list[dict]], plots: Plotter) -> list[Block]:
    blocks: list[Block] = [Heading("Sweeps")]
    curves = []
    for i, (label, records) in enumerate(runs.items()):
        blocks.append(Heading(label, 3))
        blocks += sweep_plots(plots, f"sweep_{i}", label, records)
        pts = sorted(
            (r for r in records if is_number(r.get("kl")) and is_number(r.get("gold_reward"))),
            key=lambda r: r["kl"],
        )
        if pts:
            curves.append(
                Curve(short_label(label), [r["kl"] for r in pts], [r["gold_reward"] for r in pts])
            )
    if curves:
        blocks.append(
            frontier_plot(
                plots,
                "sweeps_reward_vs_kl",
                curves,
                "gold reward against KL of the sweeps, one curve per sweep",
            )
        )
    return blocks


def sweep_plots(plots: Plotter, name: str, label: str, records: Sequence[dict]) -> list[Block]:
    """A table, metrics against a scalar alpha, and the trade-off between the first two rewards."""
    flat = [flat_record(r) for r in records]
    headers, rows = sweep_table(records)
    param, keys = headers[0], headers[1:]
    blocks: list[Block] = [Table(headers, rows)]
    scalar = [r for r in flat if is_number(r.get(param))]
    shown = [k for k in keys if not k.endswith("_se")][:6]
    if scalar and shown:
        scalar.sort(key=lambda r: r[param])

        def draw(ax: Any, key: str) -> None:
            pts = [(r[param], r[key]) for r in scalar if is_number(r.get(key))]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
            ax.set_title(key)
            ax.set_xlabel(param)
            ax.grid(alpha=0.3)

        blocks.append(
            plots.save_grid(
                f"{name}_{param}_sweep", shown, draw, f"{label}: metrics against {param}"
            )
        )
    rewards = [k for k in keys if is_reward_key(k)]
    if len(rewards) >= 2:
        y, x = (rewards[0], rewards[1]) if rewards[0] == "gold_reward" else (rewards[1], rewards[0])

        blocks.append(
            plots.save(
                f"{name}_tradeoff",
                labelled_scatter(flat, x, y, param),
                f"{label}: {y} against {x}, points labelled by {param}",
            )
        )
    return blocks


def labelled_scatter(
    points: Sequence[dict], x: str, y: str, label_key: str | None
) -> Callable[[Any], None]:
    """A drawing of y against x through the points, each labelled by its `label_key` value."""

    def draw(ax: Any) -> None:
        pts = [p for p in points if is_number(p.get(x)) and is_number(p.get(y))]
        ax.plot([p[x] for p in pts], [p[y] for p in pts], marker="o")
        for p in pts:
            ax.annotate(
                cell_text(p.get(label_key)) if label_key else "",
                (p[x], p[y]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)

    return draw


def sweep_table(records: Sequence[dict]) -> tuple[list[str], list[list[Any]]]:
    flat = [flat_record(r) for r in records]
    param = next(k for k in SWEEP_KEYS if any(k in r for r in flat))
    keys = numeric_keys(flat, exclude={param, "seconds"})
    return [param, *keys], [[r.get(param), *(r.get(k) for k in keys)] for r in flat]


def tradeoff_blocks(plots: Plotter, name: str, label: str, points: Sequence[dict]) -> list[Block]:
    """Two objectives traded by a weight vector: the first two metrics against each other."""
    flat = [flat_record(p) for p in points]
    weight = next((k for k in ("weights", *SWEEP_KEYS) if any(k in p for p in flat)), None)
    metrics = [k for k in numeric_keys(flat, exclude={"kl", "seconds"}) if not k.endswith("_se")]
    columns = metrics + (["kl"] if any("kl" in p for p in flat) else [])
    rows = [
        [p.get(weight) if weight else i, *(p.get(c) for c in columns)] for i, p in enumerate(flat)
    ]
    blocks: list[Block] = [Table([weight or "#", *columns], rows)]
    if len(metrics) >= 2:
        y, x = metrics[0], metrics[1]

        blocks.append(
            plots.save(
                f"{name}_tradeoff",
                labelled_scatter(flat, x, y, weight),
                f"{label}: {y} against {x}" + (f", points labelled by {weight}" if weight else ""),
            )
        )
    return blocks


def archive_blocks(archives: dict[str, list[dict]], plots: Plotter) -> list[Block]:
    blocks: list[Block] = [Heading("Discovery leaderboard")]
    for i, (label, records) in enumerate(archives.items()):
        valid = [r for r in records if r.get("valid") and is_number(r.get("fitness"))]
        best: dict[Any, dict] = {}
        for r in valid:  # one row per distinct objective: its best score
            key = r.get("code_hash") or r.get("name")
            if key not in best or r["fitness"] > best[key]["fitness"]:
                best[key] = r
        ranked = sorted(best.values(), key=lambda r: r["fitness"], reverse=True)[:LEADERBOARD_ROWS]
        invalid = [r for r in records if not r.get("valid")]
        blocks.append(Heading(label, 3))
        blocks.append(
            Text(f"{len(records)} proposals, {len(valid)} valid, {len(invalid)} rejected.")
        )
        table = [
            [
                k + 1,
                r.get("name"),
                r.get("generation"),
                r.get("fitness"),
                r.get("valid"),
                r.get("reason") or "",
            ]
            for k, r in enumerate(ranked)
        ]
        table += [
            [
                "-",
                r.get("name"),
                r.get("generation"),
                r.get("fitness"),
                r.get("valid"),
                short_label(str(r.get("reason") or ""), 120),
            ]
            for r in invalid[:10]
        ]
        blocks.append(Table(["rank", "name", "generation", "fitness", "valid", "reason"], table))
        gens = sorted({r["generation"] for r in valid if is_number(r.get("generation"))})
        if gens:

            def draw(ax: Any, valid: list[dict] = valid, gens: list = gens) -> None:
                ax.scatter(
                    [r["generation"] for r in valid if is_number(r.get("generation"))],
                    [r["fitness"] for r in valid if is_number(r.get("generation"))],
                    s=12,
                    alpha=0.5,
                    label="proposals",
                )
                running, best_so_far = [], -math.inf
                for g in gens:
                    best_so_far = max(
                        best_so_far, max(r["fitness"] for r in valid if r.get("generation") == g)
                    )
                    running.append(best_so_far)
                ax.step(gens, running, where="post", color="C3", label="best so far")
                ax.set_xlabel("generation")
                ax.set_ylabel("fitness")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7)

            blocks.append(
                plots.save(f"discovery_{i}", draw, f"discovery fitness by generation: {label}")
            )
    return blocks


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def numeric_keys(records: Sequence[dict], exclude: set[str]) -> list[str]:
    keys: dict[str, None] = {}
    for r in records:
        for k, v in r.items():
            if k not in exclude and is_number(v):
                keys[k] = None
    return list(keys)


def flat_record(record: dict) -> dict:
    """{"extra_rewards": {"brevity": 1}} -> {"extra_rewards/brevity": 1}."""
    return flatten(record, sep="/")


def is_reward_key(key: str) -> bool:
    return "reward" in key and not key.endswith("_se")


def last_value(records: Sequence[dict], key: str) -> Any:
    for r in reversed(records):
        if is_number(r.get(key)):
            return r[key]
    return None


def short_label(text: str, limit: int = 40) -> str:
    text = text.removesuffix("/metrics.jsonl").removesuffix(".jsonl")
    return text if len(text) <= limit else "..." + text[-(limit - 3) :]
