"""Plots of a report: numbered PNGs (`Plotter`) and the gold-reward-against-KL frontier."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefalign.report.blocks import Image


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

    def save(
        self, name: str, draw: Callable[[Any], None], caption: str, width: float = 4.6
    ) -> Image:
        """One plot: `draw(ax)` fills a single axes."""
        return self.save_grid(name, ["_"], lambda ax, _: draw(ax), caption, width)

    def save_grid(
        self,
        name: str,
        keys: Sequence[str],
        draw: Callable[[Any, str], None],
        caption: str,
        width: float = 4.6,
    ) -> Image:
        """Small multiples: `draw(ax, key)` fills one panel per key (`width` inches), three to a
        row."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        cols = min(len(keys), 3)
        rows = math.ceil(len(keys) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(width * cols, 3.6 * rows), squeeze=False)
        for ax, key in zip(axes.flat, keys, strict=False):
            draw(ax, key)
        for ax in list(axes.flat)[len(keys) :]:
            ax.set_visible(False)
        fig.tight_layout()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"{self.prefix}{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return Image(path, caption)


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
        style = dict(
            color=colors[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20],
            marker=markers[i % len(markers)],
            label=c.label,
        )
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
