"""prefalign.io: atomic writes, JSON Lines with located errors, prompt files, flattening."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from prefalign.errors import UserError
from prefalign.io import (
    MAX_DEPTH,
    JsonlError,
    append_jsonl,
    atomic_write,
    flatten,
    iter_jsonl,
    read_jsonl,
    read_prompts,
    write_jsonl,
)


def test_atomic_write_replaces_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "out.json"
    atomic_write(path, "old")
    atomic_write(path, b"new")
    assert path.read_text() == "new"
    assert os.listdir(path.parent) == ["out.json"]


def test_atomic_write_that_fails_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "out.txt"
    atomic_write(path, "old")
    with pytest.raises(TypeError):
        atomic_write(path, 5)  # type: ignore[arg-type]  # fails inside the write
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_jsonl_round_trip_writes_non_finite_floats_as_null(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, [{"a": 1.5}, {"loss": math.nan, "x": [math.inf, 2.0]}])
    append_jsonl(path, {"b": -math.inf})
    assert "NaN" not in path.read_text() and "Infinity" not in path.read_text()
    assert read_jsonl(path) == [{"a": 1.5}, {"loss": None, "x": [None, 2.0]}, {"b": None}]


BAD_LINES = {
    "bad_json": ('{"a": }', "invalid JSON: Expecting value (column 7)"),
    "invalid_utf8": (b'{"a": "caf\xe9"}', "invalid UTF-8 (byte 11 of the line)"),
    "too_deep": ("[" * 100_000 + "]" * 100_000, f"JSON nested deeper than {MAX_DEPTH} levels"),
    "bad_string": ('{"a": "\\ud800"}', "lone UTF-16 surrogate (\\ud800)"),
    "bad_number": ('{"a": ' + "9" * 5000 + "}", "number too long to read"),
}


@pytest.mark.parametrize("reason", list(BAD_LINES))
def test_a_bad_line_is_a_located_error(tmp_path: Path, reason: str) -> None:
    line, expected = BAD_LINES[reason]
    path = tmp_path / "rows.jsonl"
    path.write_bytes(
        b'{"ok": 1}\n\n' + (line if isinstance(line, bytes) else line.encode()) + b"\n"
    )
    with pytest.raises(JsonlError) as info:
        read_jsonl(path)
    assert isinstance(info.value, UserError)
    assert str(info.value).startswith(f"{path}:3: ")
    assert expected in str(info.value)
    assert info.value.reason == reason and info.value.line == 3
    rows = list(iter_jsonl(path, errors="yield"))
    assert rows[0] == (1, {"ok": 1}) and isinstance(rows[1][1], JsonlError)


def test_brackets_inside_strings_are_not_nesting(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    text = "[" * 500 + '\\"' + "{" * 500
    path.write_text(json.dumps({"code": text}) + "\n")
    assert read_jsonl(path) == [{"code": text}]


def test_read_jsonl_wants_objects(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n[1]\n')
    with pytest.raises(JsonlError, match=r"rows.jsonl:2: expected a JSON object, got list"):
        read_jsonl(path)
    assert read_jsonl(path, objects=False) == [{"a": 1}, [1]]


def test_read_prompts_from_jsonl_and_text(tmp_path: Path) -> None:
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a"}\n\n{"prompt": "b", "id": 2}\n')
    assert read_prompts(jsonl) == ["a", "b"]
    text = tmp_path / "p.txt"
    text.write_text("first\n\nsecond\n")
    assert read_prompts(text) == ["first", "second"]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (
            '{"prompt": "a"}\n{"text": "b"}\n',
            "p.jsonl:2: expected an object with a string field 'prompt', got null",
        ),
        ('{"prompt": 3}\n', "p.jsonl:1: expected an object with a string field 'prompt', got int"),
        ('"a"\n', "p.jsonl:1: expected an object with a string field 'prompt', got str"),
        ("\n\n", "holds no prompts"),
    ],
)
def test_read_prompts_errors_name_file_and_line(
    tmp_path: Path, content: str, expected: str
) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        read_prompts(path)


def test_read_prompts_missing_file_names_the_label(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"^--prompts .*nope.jsonl: no such file$"):
        read_prompts(tmp_path / "nope.jsonl", label="--prompts")


def test_flatten_joins_keys_and_keeps_empty_mappings() -> None:
    tree = {"a": {"b": 1, "c": {"d": [1]}}, "e": {}, "f": None}
    assert flatten(tree) == {"a.b": 1, "a.c.d": [1], "e": {}, "f": None}
    assert flatten({"x": {"y": 2}}, sep="/") == {"x/y": 2}


def test_nesting_is_bounded_below_the_parsers_own_limit(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    ok = "[" * MAX_DEPTH + "]" * MAX_DEPTH
    path.write_text(ok + "\n" + '{"a": ' + "[" * MAX_DEPTH + "]" * MAX_DEPTH + "}\n")
    with pytest.raises(JsonlError, match=rf"rows.jsonl:2: JSON nested deeper than {MAX_DEPTH}"):
        read_jsonl(path, objects=False)
    path.write_text(ok + "\n")
    assert len(read_jsonl(path, objects=False)) == 1
