"""Every registered task is named where a command asks for one, with what it needs."""

from __future__ import annotations

import subprocess
import sys

from prefalign import tasks


def fresh_process(*args: str) -> str:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, check=True
    ).stdout


def test_eval_help_lists_every_registered_task_with_the_smol_ones():
    flat = " ".join(fresh_process("-m", "prefalign.cli", "eval", "--help").split())  # unwrapped
    # The names a fresh interpreter registers: other tests register tasks in this process.
    listing = "from prefalign import tasks; print(' '.join(tasks.task_names()))"
    names = fresh_process("-c", listing).split()
    assert {"smol:sentiment", "smol:arith", "smol:brevity", "toy:arith"} <= set(names)
    for name in names:
        assert name in flat


def test_a_provider_whose_modules_are_missing_is_listed_with_how_to_install_them(
    tmp_path, monkeypatch
):
    (tmp_path / "needy_tasks.py").write_text(
        "from prefalign.tasks import Task, register_task\n"
        "register_task(Task('needy:count', lambda split: ['p'], lambda p, r: [0.0] * len(p)))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(tasks, "_PROVIDERS", dict(tasks._PROVIDERS))
    monkeypatch.setattr(tasks, "_PROVIDER_NEEDS", dict(tasks._PROVIDER_NEEDS))
    monkeypatch.setattr(tasks, "_TASKS", dict(tasks._TASKS))
    tasks.register_provider(
        "needy", "needy_tasks", needs=("no_such_module_here",), install="pip install no-such"
    )
    text = tasks.describe_tasks()
    assert "needy:count (needs no_such_module_here, not installed: pip install no-such)" in text
    assert "toy:arith" in text and "toy:arith (needs" not in text
