"""Builds that give the same weights whatever the machine's load or the caller's thread setting.

A CPU matmul splits its reductions across the intra-op threads, so the float sums (and, after a
few hundred optimizer steps, every weight) depend on how many threads torch uses: measured here,
one thread and two threads give different worlds, while two builds with the same thread count
are identical with or without a competing load. Thread timing does not enter; the thread
count and the CPU's kernels (AVX2 vs AVX-512, vendor libraries) do. So a build runs with one
fixed thread count and deterministic algorithms, and every random source is seeded from the
world's config. Different CPUs may still differ in the last bits.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

BUILD_THREADS = 1  # also the fastest setting on a shared 2-core machine for a 1M-parameter model


@contextmanager
def deterministic_build(threads: int = BUILD_THREADS) -> Iterator[None]:
    """Fix torch's intra-op thread count and turn on deterministic algorithms, then restore both."""
    saved_threads = torch.get_num_threads()
    saved_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved_deterministic)
        torch.set_num_threads(saved_threads)
