"""A toy world builds to the same weights and data on one machine whatever its load."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from conftest import MINI_WORLD
from safetensors.torch import load_file

from prefalign.toy.world import ToyConfig, build_world

# The mini world of the end-to-end tests, at this test's own step counts.
TINY = {**MINI_WORLD, "pretrain_steps": 20, "sft_steps": 10}
DATA_FILES = (
    "sft.jsonl",
    "pairs.jsonl",
    "pairs_eval.jsonl",
    "unpaired.jsonl",
    "prompts_train.jsonl",
    "prompts_eval.jsonl",
    "policy/tokenizer.json",
)


def busy_processes(n: int) -> list[subprocess.Popen]:
    """Competing CPU load: `n` processes spinning in a loop."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


@pytest.mark.slow
def test_build_is_identical_under_load_and_any_thread_setting(tmp_path):
    config = replace(ToyConfig.for_task("sentiment"), **TINY)
    threads = torch.get_num_threads()
    load = busy_processes(2)
    try:
        torch.set_num_threads(2)  # a caller with two threads, on a loaded machine
        loaded = build_world(config, tmp_path / "loaded", log=lambda *_: None)
    finally:
        for process in load:
            process.kill()
            process.wait()
    torch.set_num_threads(1)  # a caller with one thread, idle
    idle = build_world(config, tmp_path / "idle", log=lambda *_: None)
    torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads  # the build restores the caller's setting

    a, b = (load_file(str(w.policy_path / "model.safetensors")) for w in (loaded, idle))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "weights differ between the two builds"
    for name in DATA_FILES:
        assert loaded.file(name).read_bytes() == idle.file(name).read_bytes(), name
    assert (
        loaded.info()["figures"]["pair_label_agreement"]
        == idle.info()["figures"]["pair_label_agreement"]
    )
