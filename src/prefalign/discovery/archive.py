"""The discovery archive: one JSON line per evaluated proposal, append-only, resumable."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefalign.io import JsonlError, iter_jsonl

# Keys every record carries; the loop may add more (e.g. "seconds", "meta").
RECORD_KEYS = (
    "generation", "index", "name", "code", "code_hash", "thought", "origin",
    "valid", "reason", "flags", "fitness", "metrics", "time",
)  # fmt: skip


class Archive:
    """Records of every proposal: valid or not, with the reason or the fitness.

    Baselines are stored with generation -1. A torn last line (a crash mid-write) is ignored
    on load, so `--resume` recomputes that one record only.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.records: list[dict[str, Any]] = []
        self.load()

    def load(self) -> list[dict[str, Any]]:
        """(Re)read the file; return the records."""
        self.records = []
        if not self.path.exists():
            return self.records
        for n, record in iter_jsonl(self.path, errors="yield"):
            if isinstance(record, JsonlError):
                continue  # a torn record (a crash mid-append), sealed by the next append
            missing = [k for k in RECORD_KEYS if not isinstance(record, dict) or k not in record]
            if missing:  # a complete line, so no crash wrote it: an edit or another file
                raise JsonlError(
                    self.path, n,
                    f"not a discovery archive record (lacks {', '.join(missing)})", "not_record",
                )  # fmt: skip
            self.records.append(record)
        return self.records

    def append(self, record: dict[str, Any]) -> None:
        missing = [k for k in RECORD_KEYS if k not in record]
        if missing:
            raise ValueError(f"archive record lacks {', '.join(missing)}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab") as f:
            if f.tell() and not self._ends_with_newline():
                f.write(b"\n")  # seal a torn record (a crash mid-write) so it stays ignorable
            f.write(json.dumps(record, allow_nan=False).encode() + b"\n")
            f.flush()
        self.records.append(record)

    def _ends_with_newline(self) -> bool:
        with self.path.open("rb") as f:
            f.seek(-1, 2)
            return f.read(1) == b"\n"

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def done(self) -> set[tuple[int, int]]:
        """(generation, index) pairs already recorded."""
        return {(r["generation"], r["index"]) for r in self.records}

    def scored(self) -> list[dict[str, Any]]:
        """Valid records with a finite fitness."""
        return scored(self.records)

    def find(self, code_hash: str) -> dict[str, Any] | None:
        """The first record of the same (normalized) code, to reuse its verdict and fitness."""
        for r in self.records:
            if r.get("code_hash") == code_hash and r.get("code"):
                return r
        return None

    def find_behaviour(self, fingerprint: str | None) -> dict[str, Any] | None:
        """The first evaluated record whose objective computes the same losses and gradients."""
        if fingerprint is None:
            return None
        for r in self.records:
            if r.get("behaviour") == fingerprint and "fitness" in r:
                return r
        return None

    def leaderboard(self, k: int = 10) -> list[dict[str, Any]]:
        """The `k` best distinct valid objectives (by behaviour where known), best first; of
        equals, the earliest."""
        best: dict[str, dict[str, Any]] = {}
        for r in self.scored():
            h = r.get("behaviour") or r["code_hash"]
            if h not in best or r["fitness"] > best[h]["fitness"]:
                best[h] = r
        ranked = sorted(best.values(), key=lambda r: r["fitness"], reverse=True)[:k]
        keys = ("name", "fitness", "origin", "generation", "index", "code_hash", "flags", "metrics")
        return [{key: r.get(key) for key in keys} | {"rank": i + 1} for i, r in enumerate(ranked)]

    def best_proposed(self) -> dict[str, Any] | None:
        """The full record of the best-scoring proposed (not baseline) objective, if any."""
        ranked = [r for r in self.leaderboard(len(self.records)) if r.get("generation", 0) >= 0]
        return self.find(ranked[0]["code_hash"]) if ranked else None


def scored(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The valid records with a finite fitness."""
    return [r for r in records if r.get("valid") and _finite(r.get("fitness"))]


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
