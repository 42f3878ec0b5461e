"""trainer.malloc_mmap_threshold_kib: freed activation-sized buffers go back to the system (glibc),
0 keeps glibc's adaptive threshold, decided once per process (a later run asking for another
value is warned), bad values are one-line config errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from prefalign.config import ConfigError, load_config
from prefalign.training import malloc
from prefalign.training.preference import PreferenceConfig

needs_glibc = pytest.mark.skipif(malloc.glibc() is None, reason="mallopt is glibc's")

# In a fresh process (the setting is process-wide): the threshold set, then a step-like pattern:
# one buffer freed (glibc's adaptive threshold rises to its size), 100 activation-sized buffers,
# the last of them kept alive (it pins the heap's top, as a step's surviving tensors do), the
# other 99 freed. Prints the resident MB still held.
PATTERN = textwrap.dedent(
    """
    import json, sys, torch
    from prefalign.training.malloc import set_mmap_threshold
    def resident_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20
    set_mmap_threshold(int(sys.argv[1]))
    first = torch.ones(2**20)  # 4 MiB
    del first
    before = resident_mb()
    buffers = [torch.ones(2**20) for _ in range(100)]
    pin = buffers[-1]  # stays alive: it pins the heap's top (a new small one may fill a hole)
    del buffers
    print(json.dumps({"held_mb": resident_mb() - before}))
    """
)


def held_after_free(kib: int) -> float:
    env = {k: v for k, v in os.environ.items() if k != malloc.ENV_THRESHOLD}
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run(
        [sys.executable, "-c", PATTERN, str(kib)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.splitlines()[-1])["held_mb"]


@needs_glibc
def test_the_default_threshold_returns_freed_buffers_and_zero_keeps_them():
    assert PreferenceConfig().trainer.malloc_mmap_threshold_kib is None  # the process's: 256
    assert held_after_free(malloc.DEFAULT_KIB) < 20  # of 400 MB freed
    assert held_after_free(0) > 300  # glibc's adaptive threshold kept them


# In a fresh process: Trainers built one after another with these thresholds (None: the key
# left unset), or a decision by the CLI / the demo first; then the PATTERN's held MB and
# what the process decided.
RUNS = textwrap.dedent(
    """
    import json, sys, torch
    from prefalign.training import malloc
    from prefalign.training.loop import Trainer, TrainerConfig
    for i, kib in enumerate(json.loads(sys.argv[1])):
        if isinstance(kib, str):  # a decision before any run: "demo:FAMILY" or "cli:ARGS"
            who, _, what = kib.partition(":")
            if who == "demo":
                from prefalign.demo.worlds import get_world_family
                get_world_family(what).decide_mmap_threshold()
            else:
                from prefalign.cli import main
                print("cli exit", main(what.split()), file=sys.stderr)
            continue
        config = TrainerConfig(out_dir=f"{sys.argv[2]}/run{i}", malloc_mmap_threshold_kib=kib)
        Trainer(torch.nn.Linear(4, 4), config, lengths=[1] * 8)
    def resident_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20
    first = torch.ones(2**20)
    del first
    before = resident_mb()
    buffers = [torch.ones(2**20) for _ in range(100)]
    pin = buffers[-1]  # stays alive: it pins the heap's top (a new small one may fill a hole)
    del buffers
    decision = malloc.process_decision()
    print(json.dumps({"held_mb": resident_mb() - before, "kib": decision.kib,
                      "source": decision.source}))
    """
)


def runs_in_one_process(tmp_path, *thresholds, env_bytes: int | None = None):
    """(the process's figures, its stderr lines that warn) after the runs of `thresholds`, with
    `MALLOC_MMAP_THRESHOLD_=env_bytes` in its environment if given."""
    env = {k: v for k, v in os.environ.items() if k != malloc.ENV_THRESHOLD}
    if env_bytes is not None:
        env[malloc.ENV_THRESHOLD] = str(env_bytes)
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run(
        [sys.executable, "-c", RUNS, json.dumps(thresholds), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    warnings = [line for line in out.stderr.splitlines() if "warning" in line]
    return json.loads(out.stdout.splitlines()[-1]), warnings


@needs_glibc
def test_a_later_run_asking_to_undo_the_threshold_is_warned_and_keeps_it(tmp_path):
    figures, warnings = runs_in_one_process(tmp_path, 256, 0)
    assert figures["held_mb"] < 20 and figures["kib"] == 256  # the first run's, in effect
    (line,) = warnings
    assert f"{tmp_path}/run1" in line and "0 (off)" in line and "256 KiB" in line
    assert f"{tmp_path}/run0" in line and "fresh process" in line


@needs_glibc
def test_a_later_run_asking_for_a_threshold_after_zero_is_warned_and_keeps_glibcs(tmp_path):
    figures, warnings = runs_in_one_process(tmp_path, 0, 256, 256)
    assert figures["held_mb"] > 300 and figures["kib"] == 0  # never set: glibc's adaptive one
    (line,) = warnings  # once per value asked for, not once per run
    assert "asks for an mmap threshold of 256 KiB" in line and "off" in line


@needs_glibc
def test_an_unset_threshold_follows_the_process_and_defaults_to_256(tmp_path):
    figures, warnings = runs_in_one_process(tmp_path, None, None)
    assert figures["kib"] == malloc.DEFAULT_KIB == 256 and figures["held_mb"] < 20
    assert not warnings
    figures, warnings = runs_in_one_process(tmp_path, 0, None)
    assert figures["kib"] == 0 and figures["held_mb"] > 300 and not warnings


@needs_glibc
def test_the_demos_run_their_rows_with_the_threshold_off(tmp_path):
    """The SmolLM2 and toy demos decide 0 for their process before their rows, whose trainers
    leave the key unset (the trainer's 256 KiB cost the real demo 542 M page faults)."""
    for family in ("smollm2", "toy"):
        figures, warnings = runs_in_one_process(tmp_path, f"demo:{family}", None, None)
        assert figures["kib"] == 0 and figures["held_mb"] > 300 and not warnings
        assert figures["source"] == f"the {family} demo"


@needs_glibc
@pytest.mark.parametrize(
    "command, key",
    [
        ("train", "trainer"),
        ("rest", "improve.trainer"),
        # The same code path (Command.trainer): a fresh interpreter each, so only in CI.
        pytest.param("sft", "trainer", marks=pytest.mark.slow),
        pytest.param("rm train", "trainer", marks=pytest.mark.slow),
        pytest.param("arm train", "trainer", marks=pytest.mark.slow),
    ],
)
def test_the_cli_decides_the_threshold_for_the_process_from_the_config(tmp_path, command, key):
    # The command itself fails at once (no such model): the threshold was decided before.
    cli = f"cli:{command} model.name_or_path=./missing {key}.malloc_mmap_threshold_kib=0"
    figures, warnings = runs_in_one_process(tmp_path, cli, 256)
    assert figures["kib"] == 0 and figures["held_mb"] > 300
    assert figures["source"] == f"config key '{key}.malloc_mmap_threshold_kib'"
    (line,) = warnings
    assert f"{tmp_path}/run1" in line and "256 KiB" in line


@needs_glibc
def test_an_environment_threshold_wins(tmp_path):
    figures, warnings = runs_in_one_process(tmp_path, None, 64, env_bytes=65536)
    assert figures["kib"] == 64 and figures["source"].startswith("MALLOC_MMAP_THRESHOLD_=65536")
    assert figures["held_mb"] < 20 and not warnings  # 64 KiB asked for: what the user set
    figures, warnings = runs_in_one_process(tmp_path, 0, env_bytes=65536)
    assert figures["kib"] == 64 and figures["held_mb"] < 20
    (line,) = warnings
    assert "MALLOC_MMAP_THRESHOLD_=65536 in the environment" in line


@pytest.mark.parametrize(
    "override, words",
    [
        ("trainer.malloc_mmap_threshold_kib=40000", "at most 32768"),
        ("trainer.malloc_mmap_threshold_kib=-1", "at least 0"),
        ("model.lean_activations=yes", "auto"),
    ],
)
def test_bad_memory_keys_are_one_line_errors(override, words):
    with pytest.raises(ConfigError) as info:
        load_config(PreferenceConfig, None, [override])
    message = str(info.value)
    assert override.split("=")[0] in message and words in message and "\n" not in message
