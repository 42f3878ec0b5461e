"""The demo's world-family registry (`--world`), run.json manifests, and the report's dispatch
on them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from prefalign.demo import (
    WorldFamily,
    get_world_family,
    method_sft,
    register_world_family,
    run_demo,
    world_family_names,
)
from prefalign.errors import UserError
from prefalign.manifest import read_manifest, write_manifest
from prefalign.report import scan_run, write_run_report


def test_the_toy_family_is_registered_by_name():
    assert "toy" in world_family_names()
    toy = get_world_family("toy")
    assert toy.tasks == ("sentiment", "arith")
    assert list(toy.rows("arith", True)) == ["sft", "rest"]
    with pytest.raises(UserError, match="unknown demo world 'nope', allowed: .*toy"):
        get_world_family("nope")


def test_a_registered_family_runs_in_the_demo(tmp_path, mini_worlds):
    from prefalign.toy.tasks import world_task

    register_world_family(
        WorldFamily(
            name="mini-test",
            tasks=("arith",),
            load=lambda task, log=print: mini_worlds[task],
            task_of=world_task,
            rows=lambda task, quick: {"sft": method_sft},
        )
    )
    results = run_demo(tmp_path / "out", quick=True, log=lambda *_: None, world="mini-test")
    assert results["world"] == "mini-test" and list(results["tasks"]) == ["arith"]
    sft = results["tasks"]["arith"]["methods"]["sft"]
    assert sft["accuracy"] is not None and sft["kl"] == pytest.approx(0.0, abs=1e-4)
    assert read_manifest(tmp_path / "out") == {
        "kind": "demo",
        "world": "mini-test",
        "quick": True,
        "tasks": ["arith"],
    }
    assert "prefalign demo" in (tmp_path / "out" / "report.md").read_text()


def test_an_unknown_world_is_a_one_line_cli_error(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "prefalign.cli", "demo", "--world", "nope", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("prefalign demo: error: unknown demo world 'nope', allowed: ")
    assert "toy" in line.split("allowed: ")[1].split(", ")


def test_the_report_reads_a_run_by_the_kind_its_manifest_names(tmp_path):
    # An archive whose records lack the keys the report would guess a discovery archive from.
    record = {"name": "a", "fitness": 0.5, "generation": 0, "metrics": {}}
    for name in ("with", "without"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "archive.jsonl").write_text(json.dumps(record) + "\n")
    write_manifest(tmp_path / "with", "discover")
    assert list(scan_run(tmp_path / "with").archives) == ["archive.jsonl"]
    assert scan_run(tmp_path / "with").kind == "discover"
    assert not scan_run(tmp_path / "without").archives
    md, _ = write_run_report(tmp_path / "with")
    assert md.read_text().startswith("# prefalign discover run: with")


def test_nested_runs_take_the_kind_of_their_nearest_manifest(tmp_path):
    write_manifest(tmp_path, "demo")
    run = tmp_path / "runs" / "arith" / "rest"
    write_manifest(run, "rest")
    (run / "steps.jsonl").write_text(json.dumps({"kind": "initial", "eval": {"kl": 0.0}}) + "\n")
    assert list(scan_run(tmp_path).rest) == ["runs/arith/rest/steps.jsonl"]
    with pytest.raises(ValueError, match="unknown run kind 'nope'"):
        write_manifest(tmp_path, "nope")


@pytest.mark.parametrize(
    "tasks, words",
    [
        ("nope", "unknown task 'nope' of the toy demo, allowed: sentiment, arith"),
        ("arith,brevity", "unknown task 'brevity' of the toy demo, allowed: sentiment, arith"),
        (",", "--tasks names no task"),
        (" , ,", "--tasks names no task"),
    ],
)
def test_demo_tasks_are_checked_before_any_world_is_built(tmp_path, monkeypatch, tasks, words):
    """An unknown task used to build a whole toy world of that name (51 s of training) before
    the error, and `--tasks ,` ran every task."""
    monkeypatch.setenv("PREFALIGN_CACHE", str(tmp_path / "cache"))
    out = subprocess.run(
        [sys.executable, "-m", "prefalign.cli", "demo", "--tasks", tasks, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr
    assert out.stdout == ""  # nothing built, nothing run
    (line,) = out.stderr.strip().splitlines()
    assert line == f"prefalign demo: error: {words}"
    assert not (tmp_path / "cache").exists()
