"""What a run directory holds: its run.json manifest, results and metrics files, images.

A directory's run.json (`prefalign.manifest`) names the kind of run that wrote it, and the kind
says which of its files feed which section (`RUN_FILES`). Files no manifest accounts for (runs
written before manifests, files copied in) are classified from the keys of their records.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefalign.io import FileContentError, iter_jsonl, json_type_name
from prefalign.manifest import read_manifest

PLOT_DIR = "report_plots"

SKIP_DIRS = {"checkpoints", "final", PLOT_DIR, "__pycache__"}

MAX_DEPTH = 6  # e.g. DEMO/runs/arith/rest/improve/g000_i00/metrics.jsonl

MAX_JSONL_BYTES = 50_000_000  # larger files are data, not metrics

SWEEP_KEYS = ("alpha", "alphas")

SAMPLE_KEYS = {"prompt", "response", "completion", "chosen", "rejected"}  # data files, not metrics

REST_KINDS = {"initial", "grow", "improve"}

# run kind -> {file name: section}: what each kind of run writes
RUN_FILES: dict[str, dict[str, str]] = {
    "train": {"metrics.jsonl": "training"},
    "sft": {"metrics.jsonl": "training"},
    "rm": {"metrics.jsonl": "training"},
    "arm": {"metrics.jsonl": "training"},
    "rest": {"steps.jsonl": "rest", "metrics.jsonl": "training"},
    "discover": {"archive.jsonl": "archives"},
    "demo": {},
}


@dataclass
class RunContents:
    root: Path
    results: dict | None = None  # the demo's results.json
    training: dict[str, list[dict]] = field(default_factory=dict)  # label -> metrics records
    rest: dict[str, list[dict]] = field(default_factory=dict)
    sweeps: dict[str, list[dict]] = field(default_factory=dict)
    archives: dict[str, list[dict]] = field(default_factory=dict)
    images: list[Path] = field(default_factory=list)
    kind: str | None = None  # the run kind its run.json names (None: no manifest)

    @property
    def empty(self) -> bool:
        return not (
            self.results
            or self.training
            or self.rest
            or self.sweeps
            or self.archives
            or self.images
        )


def scan_run(run_dir: str | Path) -> RunContents:
    """Find and classify every metrics file and image under `run_dir` (checkpoints skipped)."""
    root = Path(run_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"report: no such run directory: {root}")
    manifest = read_manifest(root)
    found = RunContents(root, kind=manifest["kind"] if manifest else None)
    kinds: dict[Path, str | None] = {}  # directory -> the kind of the nearest run.json
    for path in walk_run(root):
        label = path.relative_to(root).as_posix()
        if path.suffix == ".png":
            found.images.append(path)
        elif path.name == "results.json" and path.parent == root:
            data = read_json(path)
            if (
                found.kind in ("demo", None)
                and isinstance(data, dict)
                and isinstance(data.get("tasks"), dict)
            ):
                check_results(path, data["tasks"])
                found.results = data
        elif path.suffix == ".jsonl" and path.stat().st_size <= MAX_JSONL_BYTES:
            records = read_jsonl(path)
            section = RUN_FILES.get(run_kind(path.parent, root, kinds) or "", {}).get(path.name)
            section = section or classify(records)
            if section is not None:
                getattr(found, section)[label] = records
    return found


def check_results(path: Path, tasks: dict) -> None:
    """The demo's results.json as the report reads it: tasks and their methods are objects."""
    for task, block in tasks.items():
        entries = [(f"tasks.{task}", block)]
        if isinstance(block, dict) and "methods" in block:
            methods = block["methods"]
            entries.append((f"tasks.{task}.methods", methods))
            if isinstance(methods, dict):
                entries += [(f"tasks.{task}.methods.{m}", row) for m, row in methods.items()]
        for field_name, value in entries:
            if not isinstance(value, dict):
                raise FileContentError(
                    f"{path}: field '{field_name}': expected an object, got {json_type_name(value)}"
                )


def run_kind(directory: Path, root: Path, cache: dict[Path, str | None]) -> str | None:
    """The kind named by the run.json of `directory` or of its nearest parent up to `root`."""
    if directory not in cache:
        manifest = read_manifest(directory)
        if manifest is not None:
            cache[directory] = manifest["kind"]
        elif directory == root or root not in directory.parents:
            cache[directory] = None
        else:
            cache[directory] = run_kind(directory.parent, root, cache)
    return cache[directory]


def walk_run(root: Path) -> Iterable[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        depth = len(Path(dirpath).relative_to(root).parts)
        dirnames[:] = sorted(
            d
            for d in dirnames
            if d not in SKIP_DIRS and not d.startswith(".") and depth < MAX_DEPTH
        )
        for name in sorted(filenames):
            yield Path(dirpath) / name


def read_json(path: Path) -> Any:
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
