"""malloc.transient_heap: inside it a no-grad phase recycles heap blocks instead of mapping and
faulting in each large buffer afresh; after it the fixed threshold returns freed buffers again;
the reference's scoring runs inside it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from prefalign.training import malloc

needs_glibc = pytest.mark.skipif(malloc.glibc() is None, reason="mallopt is glibc's")

# In a fresh process (the threshold is process-wide), after a model-sized buffer was freed (a
# training process has loaded its weights by then): 256 KiB fixed, then 30 "layers" of four
# 2 MiB buffers each, each layer's freed before the next (a no-grad forward's pattern), counted
# in page faults outside and inside transient_heap; then 100 buffers freed after the block,
# which the fixed threshold must return to the system again.
PATTERN = textwrap.dedent(
    """
    import json, resource, torch
    from prefalign.training import malloc
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    def resident_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20
    def layers():
        start = faults()
        for _ in range(30):
            buffers = [torch.ones(2**19) for _ in range(4)]
            del buffers
        return faults() - start
    weights = torch.ones(2**22)  # 16 MiB loaded and freed before the trainer fixes the
    del weights  # threshold, as a model load does: glibc raises its trim threshold to match
    malloc.set_mmap_threshold(256)
    layers()
    outside = layers()
    with malloc.transient_heap():
        layers()
        inside = layers()
    before = resident_mb()
    buffers = [torch.ones(2**19) for _ in range(100)]
    pin = torch.ones(2**12)
    del buffers
    print(json.dumps({"outside": outside, "inside": inside, "held_mb": resident_mb() - before}))
    """
)


@needs_glibc
def test_a_transient_phase_recycles_heap_blocks_and_the_threshold_comes_back():
    env = {k: v for k, v in os.environ.items() if k != malloc.ENV_THRESHOLD}
    out = subprocess.run(
        [sys.executable, "-c", PATTERN], env=env, capture_output=True, text=True, check=True
    )
    got = json.loads(out.stdout.splitlines()[-1])
    assert got["outside"] > 30 * 4 * 400, got  # every 2 MiB buffer faulted in (512 pages each)
    assert got["inside"] < got["outside"] / 20, got  # the same blocks reused layer after layer
    assert got["held_mb"] < 20  # of 200 MB freed after the block: returned as before


def test_without_a_fixed_threshold_it_changes_nothing(monkeypatch):
    calls = []
    monkeypatch.setattr(malloc, "_applied", None)
    monkeypatch.setattr(malloc, "glibc", lambda: calls.append(1))
    with malloc.transient_heap():
        pass
    assert not calls


def test_the_reference_scores_inside_a_transient_heap(monkeypatch):
    import contextlib

    import torch

    from prefalign.reference import ModelReference

    inside = []

    @contextlib.contextmanager
    def watched():
        inside.append(True)
        yield
        inside.append(False)

    monkeypatch.setattr(malloc, "transient_heap", watched)
    reference = ModelReference(torch.nn.Linear(3, 3))
    seen = reference.score(lambda model: (list(inside), torch.is_grad_enabled()))
    assert seen == ([True], False) and inside == [True, False]
