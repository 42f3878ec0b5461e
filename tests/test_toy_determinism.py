"""A toy world builds to the same weights and data on one machine whatever its load."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from prefalign.toy.world import ToyConfig, ToyModelSize, build_world

TINY = dict(
    model=ToyModelSize(hidden_size=32, layers=2, heads=4, intermediate_size=64),
    corpus_size=800,
    pretrain_steps=20,
    sft_steps=10,
    batch_size=16,
    n_pair_prompts=48,
    samples_per_prompt=2,
    n_eval_pairs=16,
    n_train_prompts=16,
    n_eval_prompts=8,
    max_new_tokens=8,
)
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
