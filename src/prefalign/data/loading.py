"""Read rows from JSONL, JSON, CSV/TSV, parquet, a saved `datasets` directory or a hub id.

A hub dataset is named `hf:owner/name`: a bare name that is no local path is an error, never a
download nobody asked for (a typo in a file name would otherwise reach the network).

JSONL is read here line by line, so a bad line or undecodable bytes name their line number;
every other format names a 1-based row index. Rows then go through `validation`, which turns
each into a record or a located `DataError`.
"""

from __future__ import annotations

import csv
import io
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefalign.data.records import (
    LINE_SUFFIXES,
    DataError,
    LoadResult,
    PreferenceRecord,
    PromptCompletionRecord,
    UnpairedRecord,
)
from prefalign.data.validation import (
    PREFERENCE_COLUMNS,
    SFT_COLUMNS,
    UNPAIRED_COLUMNS,
    Row,
    check_columns,
    preference_record,
    sft_record,
    type_name,
    unpaired_record,
)
from prefalign.io import JsonlError, JsonProblem, check_value, iter_jsonl, parse_json_text

FILE_SUFFIXES = (*LINE_SUFFIXES, ".json", ".csv", ".tsv", ".parquet")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
HUB_PREFIX = "hf:"
SAVED_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass
class Source:
    name: str
    rows: Iterator[tuple[int, Any]]  # (line or row number, parsed row or the DataError it raised)
    columns: list[str] | None = None  # known up front for tabular formats
    typed: bool = True  # False for CSV: every cell is a string


def open_source(path_or_id: str | Path, split: str = "train") -> Source:
    """Route a path or `hf:` hub id to its reader. Local paths never fall through to the hub."""
    name = str(path_or_id)
    if name.startswith(HUB_PREFIX):
        hub_id = name.removeprefix(HUB_PREFIX)
        if not HUB_ID.match(hub_id):
            raise DataError(
                name,
                None,
                "not a hub dataset id (hf:owner/name)",
                reason="not_found",
                row_level=False,
            )
        return _datasets_source(hub_id, split, local=False)
    path = Path(path_or_id)
    suffix = path.suffix.lower()
    if path.is_dir():
        return _datasets_source(name, split, local=True)
    if path.is_file():
        if suffix in LINE_SUFFIXES:
            return Source(name, _jsonl_rows(path, name))
        if suffix == ".json":
            return _json_source(path, name)
        if suffix in (".csv", ".tsv"):
            return _csv_source(path, name, delimiter="\t" if suffix == ".tsv" else ",")
        if suffix == ".parquet":
            return _parquet_source(path, name)
        raise DataError(
            name,
            None,
            f"unknown file type '{suffix}'; use one of {', '.join(FILE_SUFFIXES)}",
            reason="unknown_file_type",
            row_level=False,
        )
    hint = ""
    if suffix not in FILE_SUFFIXES and not name.startswith((".", "/", "~")) and HUB_ID.match(name):
        hint = f" (a Hugging Face Hub dataset? write {HUB_PREFIX}{name})"
    raise DataError(
        name, None, f"no such file or directory{hint}", reason="not_found", row_level=False
    )


def _jsonl_rows(path: Path, name: str) -> Iterator[tuple[int, Any]]:
    for n, value in iter_jsonl(path, errors="yield"):
        if isinstance(value, JsonlError):  # the loader decides: raise, or skip and count
            value = DataError(name, n, value.what, reason=value.reason)
        yield n, value


def _read_text(path: Path, name: str) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(
            name,
            None,
            f"invalid UTF-8 on line {line}; save the file as UTF-8",
            reason="invalid_utf8",
            row_level=False,
        ) from exc


def _json_source(path: Path, name: str) -> Source:
    text = _read_text(path, name)
    if not text.strip():
        return Source(name, iter(()))
    try:
        data = parse_json_text(text)
    except JsonProblem as exc:
        what = exc.what
        if exc.reason == "bad_json":
            msg = what.removeprefix("invalid JSON: ").rsplit(" (column", 1)[0]
            hint = " (one object per line? name the file .jsonl)" if msg == "Extra data" else ""
            what = f"invalid JSON on line {exc.line}: {msg}{hint}"
        raise DataError(name, None, what, reason=exc.reason, row_level=False) from None
    if not isinstance(data, list):
        raise DataError(
            name,
            None,
            f"expected a JSON list of objects at the top level, got {type_name(data)}",
            reason="not_a_list",
            row_level=False,
        )
    return Source(name, _checked_rows(name, data))


def _checked_rows(name: str, data: list) -> Iterator[tuple[int, Any]]:
    for n, value in enumerate(data, start=1):
        try:
            check_value(value)
        except JsonProblem as exc:
            value = DataError(name, n, exc.what, reason=exc.reason)
        yield n, value


def _csv_source(path: Path, name: str, delimiter: str) -> Source:
    reader = csv.reader(io.StringIO(_read_text(path, name), newline=""), delimiter=delimiter)
    columns = next(reader, [])

    def rows() -> Iterator[tuple[int, Any]]:
        n = 0
        for cells in reader:
            if not cells:
                continue  # a blank line is not a row
            n += 1
            if len(cells) != len(columns):
                yield (
                    n,
                    DataError(
                        name,
                        n,
                        f"{len(cells)} cells but the header has {len(columns)} columns",
                        reason="bad_csv_row",
                    ),
                )
            else:
                yield n, dict(zip(columns, cells, strict=True))

    return Source(name, rows(), columns=columns, typed=False)


def _parquet_source(path: Path, name: str) -> Source:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise DataError(
            name, None, f"cannot read parquet: {exc}", reason="bad_file", row_level=False
        ) from exc
    return Source(name, enumerate(table.to_pylist(), start=1), columns=table.column_names)


def _datasets_source(name: str, split: str, *, local: bool) -> Source:
    import datasets

    if local and any((Path(name) / f).exists() for f in SAVED_DATASET_FILES):
        ds = datasets.load_from_disk(name)
    else:
        # A hub id, or a local folder of data files that `datasets` knows how to read.
        try:
            ds = datasets.load_dataset(name, split=split)
        except (ConnectionError, FileNotFoundError) as exc:  # offline, or no such dataset
            if local:
                raise
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise DataError(
                HUB_PREFIX + name, None, f"cannot load it from the Hugging Face Hub ({first})",
                reason="bad_file", row_level=False,
            ) from None  # fmt: skip
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(
                name,
                None,
                f"no split '{split}' (splits: {', '.join(ds)})",
                reason="no_split",
                row_level=False,
            )
        ds = ds[split]
    label = name if local else HUB_PREFIX + name
    label = label if split == "train" else f"{label}[{split}]"
    return Source(label, enumerate(ds, start=1), columns=list(ds.column_names))


def _load(
    path_or_id: str | Path,
    convert: Callable[[Any, Row], Any],
    columns: tuple[tuple[str, ...], ...],
    tokenizer: Any,
    skip_invalid: bool,
    split: str,
) -> LoadResult:
    source = open_source(path_or_id, split)
    if source.columns:  # tabular: check the header once, not every row
        check_columns(source.name, source.columns, columns)
    result: LoadResult = LoadResult([], Counter(), source.name)
    for line, value in source.rows:
        try:
            if isinstance(value, DataError):
                raise value
            result.records.append(convert(value, Row(source.name, line, tokenizer, source.typed)))
        except DataError as exc:
            if not (skip_invalid and exc.row_level):
                raise
            result.skipped[exc.reason] += 1
    if not result.records:
        # Training on nothing is never what was meant, even with skip_invalid.
        if result.skipped:
            reasons = ", ".join(f"{k}: {n}" for k, n in sorted(result.skipped.items()))
            raise DataError(
                source.name,
                None,
                f"no valid records; all rows skipped ({reasons})",
                reason="no_valid_records",
                row_level=False,
            )
        raise DataError(
            source.name, None, "empty file: no records", reason="empty", row_level=False
        )
    return result


def load_preference_data(
    path_or_id: str | Path,
    *,
    tokenizer: Any = None,
    skip_invalid: bool = False,
    split: str = "train",
) -> LoadResult[PreferenceRecord]:
    """Load prompt/chosen/rejected pairs (standard, conversational or implicit-prompt rows).

    Raises a one-line `DataError` naming file, line and field at the first bad row, unless
    `skip_invalid`, which skips bad rows and counts them in `result.skipped` by reason.
    A `tokenizer` with a chat template is needed only for conversational rows.
    """
    return _load(path_or_id, preference_record, PREFERENCE_COLUMNS, tokenizer, skip_invalid, split)


def load_unpaired_data(
    path_or_id: str | Path,
    *,
    tokenizer: Any = None,
    skip_invalid: bool = False,
    split: str = "train",
) -> LoadResult[UnpairedRecord]:
    """Load prompt/completion/label rows for KTO (label true = desirable)."""
    return _load(path_or_id, unpaired_record, UNPAIRED_COLUMNS, tokenizer, skip_invalid, split)


def load_sft_data(
    path_or_id: str | Path,
    *,
    tokenizer: Any = None,
    skip_invalid: bool = False,
    split: str = "train",
) -> LoadResult[PromptCompletionRecord]:
    """Load prompt/completion rows, or conversational `messages` rows ending in an assistant
    turn."""
    return _load(path_or_id, sft_record, SFT_COLUMNS, tokenizer, skip_invalid, split)
