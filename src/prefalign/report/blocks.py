"""The report's building blocks (headings, text, tables, images), rendered to Markdown and to
one self-contained HTML page."""

from __future__ import annotations

import base64
import html
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

COLUMNS = (
    "gold_reward",
    "gold_reward_se",
    "kl",
    "kl_se",
    "accuracy",
    "mean_length",
    "seconds",  # the row's wall time
    "cpu_seconds",  # user + system, all threads: what the row costs on a busy machine
)


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
            lines += [
                "| " + " | ".join(cell_text(c).replace("|", "\\|") for c in row) + " |"
                for row in b.rows
            ]
            lines.append("")
        else:
            lines += [f"![{b.caption}]({Path(os.path.relpath(b.path, base)).as_posix()})", ""]
    return "\n".join(lines)


CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 72rem; padding: 0 1rem;
  color: #222; }
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
    body = [
        f"<h1>{esc(title)}</h1>",
        f'<p class="meta">generated {time.strftime("%Y-%m-%d %H:%M:%S")}</p>',
    ]
    for b in blocks:
        if isinstance(b, Heading):
            body.append(f"<h{b.level}>{esc(b.text)}</h{b.level}>")
        elif isinstance(b, Text):
            body.append(f"<p>{esc(b.text)}</p>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{esc(h)}</th>" for h in b.headers)
            rows = "".join(
                "<tr>" + "".join(f"<td>{esc(cell_text(c))}</td>" for c in row) + "</tr>"
                for row in b.rows
            )
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


def cell_text(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(cell_text(v) for v in value)
    return fmt(value)


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)
