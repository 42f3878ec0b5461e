"""Writing a benchmark's results: every script's JSON starts with how it was produced.

The header names the exact command (so a figure can be reproduced by one line), the torch
version, the thread count and the load average (a shared machine's load moves absolute times).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any


def run_header(script: str, threads: int | None = None) -> dict[str, Any]:
    """The fields every results file starts with; `script` is the bench script's `__file__`."""
    import torch

    header: dict[str, Any] = {
        "command": f"python bench/{Path(script).name} " + " ".join(sys.argv[1:]),
        "torch": torch.__version__,
    }
    if threads is not None:
        header["threads"] = threads
    header["load_avg_1m"] = os.getloadavg()[0]
    return header


def write_results(path: Path, result: dict[str, Any]) -> None:
    """Write `result` as indented JSON at `path` (parents made) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
