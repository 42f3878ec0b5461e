"""trainer.malloc_mmap_threshold_kib: freed activation-sized buffers go back to the system (glibc),
0 keeps glibc's adaptive threshold, bad values are one-line config errors."""

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
# a small one allocated after them that stays alive (it pins the heap's top, as a step's
# surviving tensors do), the 100 freed. Prints the resident MB still held.
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
    pin = torch.ones(2**16)
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
    default = PreferenceConfig().trainer.malloc_mmap_threshold_kib
    assert default > 0
    assert held_after_free(default) < 20  # of 400 MB freed
    assert held_after_free(0) > 300  # glibc's adaptive threshold kept them


def test_the_trainer_sets_its_configured_threshold(tmp_path, monkeypatch):
    import torch

    from prefalign.training.loop import Trainer, TrainerConfig

    asked = []
    monkeypatch.setattr(malloc, "set_mmap_threshold", asked.append)
    config = TrainerConfig(out_dir=str(tmp_path), malloc_mmap_threshold_kib=1024)
    Trainer(torch.nn.Linear(4, 4), config, lengths=[1] * 8)
    assert asked == [1024]


def test_an_environment_threshold_wins(monkeypatch):
    monkeypatch.setenv(malloc.ENV_THRESHOLD, "65536")
    assert malloc.set_mmap_threshold(256) is False
    assert malloc.set_mmap_threshold(0) is False


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
