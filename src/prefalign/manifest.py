"""run.json: the manifest of a run directory, naming what kind of run wrote it.

Every command that writes a run directory writes one (`prefalign train` "train", `sft`, `rest`,
`rm` (reward model), `arm`, `discover`, `demo`), so `prefalign report` knows what the directory
holds instead of guessing it from the keys of its files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefalign.errors import RunDirError
from prefalign.io import atomic_write

MANIFEST = "run.json"
RUN_KINDS = ("train", "sft", "rest", "rm", "arm", "discover", "demo")


def write_manifest(run_dir: str | Path, kind: str, info: dict[str, Any] | None = None) -> Path:
    """Write RUN_DIR/run.json: {"kind": kind, **info}."""
    if kind not in RUN_KINDS:
        raise ValueError(f"unknown run kind {kind!r}, allowed: {', '.join(RUN_KINDS)}")
    run_dir = make_run_dir(run_dir)
    body = json.dumps({"kind": kind, **(info or {})}, indent=2, default=str)
    return atomic_write(run_dir / MANIFEST, body + "\n")


def make_run_dir(run_dir: str | Path) -> Path:
    """Create a run directory (and its parents); one that cannot be made (a file in the way, no
    permission) is a one-line `RunDirError` naming it, not a bare Errno message."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunDirError(f"out_dir {run_dir}: cannot create it ({err.strerror})") from None
    return run_dir


def read_manifest(run_dir: str | Path) -> dict[str, Any] | None:
    """The manifest of RUN_DIR, or None if it has none (or an unreadable one)."""
    path = Path(run_dir) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("kind") in RUN_KINDS else None
