"""Files, written and read once: atomic writes, JSON Lines, prompt files, flat config views.

- `atomic_write(path, text_or_bytes)`: a complete file or the old one, never half a file
  (a temporary file in the same directory, fsynced, then renamed over the target).
- `read_jsonl(path)` / `iter_jsonl(path)`: one JSON value per line; a bad line is a
  `JsonlError` naming `file:line` (invalid UTF-8 or JSON, nesting deeper than `MAX_DEPTH`,
  lone UTF-16 surrogates, numbers of more digits than Python converts).
- `write_jsonl(path, rows)` (atomic) and `append_jsonl(path, row)`: strict JSON, so a
  non-finite float is written as null instead of the bare `NaN` other parsers reject.
- `read_prompts(path)`: prompts from a JSONL file of `{"prompt": ...}` rows or a text file
  with one prompt a line.
- `flatten(tree)`: `{"a": {"b": 1}}` -> `{"a.b": 1}`, for run configs and metric records.
"""

from __future__ import annotations

import codecs
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from prefalign.errors import UserError

# Deeper than any real record or config; Python's own parsers recurse and crash far beyond it.
MAX_DEPTH = 64
JSONL_SUFFIXES = (".jsonl", ".ndjson")


class FileContentError(UserError, ValueError):
    """A file that cannot be used as given; the message names it (and the line, where known).
    A ValueError too, for callers that caught what the readers replaced here raised."""


class JsonlError(FileContentError):
    """One bad line of a JSON Lines file: `data.jsonl:7: invalid JSON: ... (column 3)`.

    `reason` is a short stable key (`bad_json`, `invalid_utf8`, `too_deep`, `bad_string`,
    `bad_number`) for callers that skip and count bad lines.
    """

    def __init__(self, path: str | Path, line: int, what: str, reason: str) -> None:
        self.path, self.line, self.what, self.reason = str(path), line, what, reason
        super().__init__(f"{path}:{line}: {what}")


# --- writing --------------------------------------------------------------------------------


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write `data` to `path` so a reader (or a crash) sees the old file or the new, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def json_line(value: Any) -> str:
    """`value` as one line of strict JSON (NaN and infinities become null), newline included."""
    try:
        text = json.dumps(value, allow_nan=False, default=str)
    except ValueError:  # a non-finite float somewhere: only then pay for the walk
        text = json.dumps(_finite(value), allow_nan=False, default=str)
    return text + "\n"


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_jsonl(path: str | Path, rows: Iterable[Any]) -> Path:
    """Write `rows` as JSON Lines, atomically."""
    return atomic_write(path, "".join(json_line(r) for r in rows))


def append_jsonl(path: str | Path, row: Any) -> None:
    """Append one row (logs that grow during a run, such as metrics.jsonl)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json_line(row))


# --- reading --------------------------------------------------------------------------------


class JsonProblem(ValueError):
    """Why a JSON text cannot be used: `reason` (a `JsonlError` reason), `what` (for the user),
    `line` (1-based within the text, when the parser knows it)."""

    def __init__(self, reason: str, what: str, line: int | None = None) -> None:
        self.reason, self.what, self.line = reason, what, line
        super().__init__(what)


def parse_json_line(raw: bytes, first: bool = False) -> Any:
    """Decode one line (bytes) of a JSON Lines file; `first` drops a UTF-8 byte-order mark.
    Raises `JsonProblem`; blank lines are the caller's to skip."""
    if first:
        raw = raw.removeprefix(codecs.BOM_UTF8)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        what = f"invalid UTF-8 (byte {exc.start + 1} of the line); save the file as UTF-8"
        raise JsonProblem("invalid_utf8", what) from None
    value = parse_json_text(text)
    check_value(value)
    return value


def parse_json_text(text: str) -> Any:
    """`json.loads` with every failure a `JsonProblem` instead of a crash or an unlocated
    message. The value is not checked here: see `check_value`."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        what = f"invalid JSON: {exc.msg} (column {exc.colno})"
        raise JsonProblem("bad_json", what, exc.lineno) from None
    except RecursionError:  # the decoder recurses once per level
        raise JsonProblem("too_deep", f"JSON nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:  # Python refuses to convert an integer of over 4300 digits
        first = str(exc).split(";")[0].split(":")[0]
        raise JsonProblem("bad_number", f"number too long to read ({first})") from None


def check_value(value: Any) -> None:
    """Refuse nesting deeper than `MAX_DEPTH` (recursive code downstream would crash on it) and
    lone UTF-16 surrogates (`"\\ud800"` in JSON: valid JSON, but not text, and every
    tokenizer and UTF-8 writer fails on it). One walk, without recursion; strings are checked
    where they are met, as most of a row is strings."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        kind = type(item)
        if kind is str:
            _check_text(item)
            continue
        if kind is not dict and kind is not list:
            continue
        if depth >= MAX_DEPTH:
            raise JsonProblem("too_deep", f"JSON nested deeper than {MAX_DEPTH} levels")
        if kind is dict:
            for key in item:
                _check_text(key)
            children = item.values()
        else:
            children = item
        for child in children:
            if type(child) is str:
                _check_text(child)
            elif type(child) is dict or type(child) is list:
                stack.append((child, depth + 1))


def _check_text(text: str) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        what = f"string holds a lone UTF-16 surrogate (\\u{ord(text[exc.start]):04x}), "
        raise JsonProblem("bad_string", what + "which is not text") from None


def iter_jsonl(path: str | Path, *, errors: str = "raise") -> Iterator[tuple[int, Any]]:
    """(line number, value) for each non-blank line. A bad line raises its `JsonlError`, or
    with `errors="yield"` comes out as the `JsonlError` in place of the value."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue  # blank lines (a trailing newline, spacing) are not rows
            try:
                yield n, parse_json_line(raw, first=n == 1)
            except JsonProblem as exc:
                error = JsonlError(path, n, exc.what, exc.reason)
                if errors != "yield":
                    raise error from None
                yield n, error


def read_jsonl(path: str | Path, *, objects: bool = True) -> list[Any]:
    """Every line's value; with `objects`, a line that is not a JSON object is a `JsonlError`."""
    rows = []
    for n, value in iter_jsonl(path):
        if objects and not isinstance(value, dict):
            raise JsonlError(
                path, n, f"expected a JSON object, got {json_type_name(value)}", "not_object"
            )
        rows.append(value)
    return rows


def json_type_name(value: Any) -> str:
    return {dict: "object", list: "list", type(None): "null"}.get(type(value), type(value).__name__)


def read_prompts(
    path: str | Path, *, label: str = "prompts file", field: str = "prompt"
) -> list[str]:
    """Prompts from a JSONL file of `{"prompt": ...}` objects (`.jsonl`/`.ndjson`), or from any
    other file as one prompt a line. `label` names the file in errors (e.g. a config key)."""
    path = Path(path)
    if not path.is_file():
        raise FileContentError(f"{label} {path}: no such file")
    if path.suffix.lower() in JSONL_SUFFIXES:
        prompts = []
        for n, row in iter_jsonl(path):
            if not isinstance(row, dict) or not isinstance(row.get(field), str):
                got = json_type_name(row.get(field) if isinstance(row, dict) else row)
                raise JsonlError(
                    path,
                    n,
                    f"expected an object with a string field '{field}', got {got}",
                    "not_prompt",
                )
            prompts.append(row[field])
    else:
        try:
            text = path.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = path.read_bytes()[: exc.start].count(b"\n") + 1
            raise FileContentError(
                f"{path}:{line}: invalid UTF-8; save the file as UTF-8"
            ) from None
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise FileContentError(f"{label} {path} holds no prompts")
    return prompts


# --- views ----------------------------------------------------------------------------------


def flatten(tree: dict[str, Any], sep: str = ".", prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level: `{"a": {"b": 1}, "c": {}}` -> `{"a.b": 1, "c": {}}`
    (an empty mapping stays a value, so a key set to `{}` is still seen)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, sep, f"{prefix}{key}{sep}"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def cache_root() -> Path:
    """Where prefalign keeps what it builds once (worlds, imported models, reference log-probs)."""
    return Path(os.environ.get("PREFALIGN_CACHE", Path.home() / ".cache" / "prefalign"))
