"""Validated records, the one error type of the data pipeline, and the result of a load."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from prefalign.errors import UserError

# Files read line by line name a line number; every other source names a row index.
LINE_SUFFIXES = (".jsonl", ".ndjson")


def where(source: str, line: int | None) -> str:
    """`data.jsonl:7` for line-based files, `data.csv:row 7` for row-based ones."""
    if line is None:
        return source
    if source.lower().endswith(LINE_SUFFIXES):
        return f"{source}:{line}"
    return f"{source}:row {line}"


class DataError(UserError, ValueError):
    """A one-line, located data problem: `data.jsonl:7: field 'chosen': expected a string, got int`.

    `reason` is a short stable key (e.g. `not_string`) under which `skip_invalid=True` counts the
    skipped row; `row_level` is False for problems of the whole file, which cannot be skipped.
    """

    def __init__(
        self,
        source: str,
        line: int | None,
        what: str,
        *,
        field: str | None = None,
        reason: str,
        row_level: bool = True,
    ) -> None:
        self.source, self.line, self.field, self.what = source, line, field, what
        self.reason = reason
        self.row_level = row_level and line is not None
        prefix = where(source, line)
        super().__init__(f"{prefix}: field '{field}': {what}" if field else f"{prefix}: {what}")


@dataclass(frozen=True)
class PreferenceRecord:
    prompt: str
    chosen: str
    rejected: str
    source: str
    line: int


@dataclass(frozen=True)
class UnpairedRecord:
    prompt: str
    completion: str
    label: bool  # True: desirable
    source: str
    line: int


@dataclass(frozen=True)
class PromptCompletionRecord:
    prompt: str
    completion: str
    source: str
    line: int


R = TypeVar("R")


@dataclass
class LoadResult(Generic[R]):
    """The records of one source and the rows skipped on the way (reason -> count)."""

    records: list[R]
    skipped: Counter[str] = field(default_factory=Counter)
    source: str = ""

    def summary(self) -> str:
        text = f"{self.source}: {len(self.records)} records"
        if self.skipped:
            reasons = ", ".join(f"{k}: {n}" for k, n in sorted(self.skipped.items()))
            text += f", {sum(self.skipped.values())} skipped ({reasons})"
        return text

    def __len__(self) -> int:
        return len(self.records)
