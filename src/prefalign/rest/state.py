"""The durable state of a ReST run: which steps are finished, and their records.

`state.json` in the run directory lists one record per finished step, in order; it is rewritten
atomically after every step, and `steps.jsonl` (the same records, one per line) with it. A step
counts as finished only once its record is here; its artifacts (a Grow step's data file, an
Improve step's model directory) are written before the record, so a finished step always has them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefalign.errors import RunDirError
from prefalign.io import atomic_write, flatten, json_line
from prefalign.manifest import make_run_dir

STATE_VERSION = 1


def step_key(record: dict[str, Any]) -> str:
    """`initial`, `grow-G` or `improve-G-I`."""
    kind = record["kind"]
    if kind == "initial":
        return kind
    if kind == "grow":
        return f"grow-{record['grow']}"
    return f"improve-{record['grow']}-{record['improve']}"


class RunState:
    def __init__(self, out_dir: Path, config: dict[str, Any], records: list[dict[str, Any]]):
        self.out_dir, self.config, self.records = out_dir, config, records
        self._by_key = {step_key(r): r for r in records}

    @classmethod
    def open(cls, out_dir: str | Path, config: dict[str, Any], resume: bool, log=print) -> RunState:
        """A fresh state, or (with `resume`) the saved one. A used directory without `resume`
        is an error rather than silently mixing two runs' artifacts."""
        out_dir = Path(out_dir)
        config = json.loads(json.dumps(config, default=str))  # compare as it will be saved
        path = out_dir / "state.json"
        if not path.exists():
            if not resume and out_dir.exists() and any(out_dir.iterdir()):
                raise RunDirError(
                    f"out_dir {out_dir} is not empty; pass --resume to continue the run there, "
                    "or choose another out_dir"
                )
            make_run_dir(out_dir)
            return cls(out_dir, config, [])
        if not resume:
            raise RunDirError(
                f"out_dir {out_dir} holds a ReST run ({path}); pass --resume to continue it, "
                "or choose another out_dir"
            )
        saved = json.loads(path.read_text())
        old, new = flatten(saved["config"]), flatten(config)
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if changed:
            log(
                f"resuming with a changed config ({', '.join(changed)}); "
                "finished steps keep the settings they ran with"
            )
        return cls(out_dir, config, saved["records"])

    def done(self, key: str) -> dict[str, Any] | None:
        return self._by_key.get(key)

    def add(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self._by_key[step_key(record)] = record
        self._write(
            "state.json",
            json.dumps(
                {"version": STATE_VERSION, "config": self.config, "records": self.records}, indent=1
            ),
        )
        self._write("steps.jsonl", "".join(json_line(r) for r in self.records))

    def _write(self, name: str, text: str) -> None:
        atomic_write(self.out_dir / name, text)
