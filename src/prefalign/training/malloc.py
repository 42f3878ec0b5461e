"""Give freed activation buffers back to the system: glibc's mmap threshold, fixed.

glibc serves an allocation of at least M_MMAP_THRESHOLD bytes from its own mmap and unmaps it
when it is freed. By default the threshold adapts: each freed mmapped block raises it to that
block's size (up to 32 MiB), so after the first training step the activation buffers of every
step come from the heap, and freed heap memory mostly stays resident (fragmentation keeps the
heap's top in use). A step's resident peak then holds what the allocator kept beside the live
tensors: about 0.5 GB on a SmolLM2-135M step. Setting the threshold turns the adaptation off,
so buffers above it are returned when freed and the resident peak is the live peak.

The cost is page faults: each new mapping is touched page by page, so a step pays for every
large buffer it allocates (on SmolLM2-135M, 4 pairs: ~0.9 M faults a step against ~0.2 M, about
a fifth more CPU time). The trainer's 256 KiB sits below a real model's activation buffers (the
key/value-sized ones of that step are 0.3 MB; at 1 MiB, batches of fewer positions kept their
hidden-size buffers in the heap and most of the gain), above the many small tensors.

The setting is the process's, decided once: glibc has no call that gives the adaptive
threshold back, so the first decision (`decide_mmap_threshold`: the CLI's, from the command's
config, or the first run's in a library process) holds until the process ends, and a later
run asking for another value is told so in one line on stderr and runs with the process's.
Only glibc has `mallopt`; elsewhere (macOS, musl) nothing is set. A threshold given by the
environment (`MALLOC_MMAP_THRESHOLD_`) wins: it is the user's own choice for the process.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
MAX_THRESHOLD_KIB = 32 * 1024  # glibc's HEAP_MAX_SIZE / 2 on 64-bit: the largest it accepts
DEFAULT_KIB = 256  # what a run that leaves the key unset asks for
ENV_THRESHOLD = "MALLOC_MMAP_THRESHOLD_"


@dataclass(frozen=True)
class Decision:
    """The process's threshold and who decided it."""

    kib: int | None  # 0: glibc's adaptive threshold; None: an environment value not in KiB
    source: str

    def describe(self) -> str:
        if self.kib == 0:
            return f"off (glibc's adaptive threshold, decided by {self.source})"
        size = f"{self.kib} KiB" if self.kib is not None else os.environ.get(ENV_THRESHOLD, "?")
        return f"{size} (decided by {self.source})"


_decision: Decision | None = None
_applied: int | None = None  # the KiB this module fixed with mallopt (transient_heap restores it)
_warned: set[tuple[int, Decision]] = set()


def glibc() -> ctypes.CDLL | None:
    """The process's C library if it is glibc (which has `mallopt`), else None."""
    try:
        libc = ctypes.CDLL(None)
        version = libc.gnu_get_libc_version
    except (OSError, AttributeError):
        return None
    version.restype = ctypes.c_char_p
    return libc if version() and hasattr(libc, "mallopt") else None


def process_decision() -> Decision | None:
    """The threshold this process runs with, or None while nothing has decided it."""
    return _decision


def environment_decision() -> Decision | None:
    raw = os.environ.get(ENV_THRESHOLD)
    if raw is None:
        return None
    source = f"{ENV_THRESHOLD}={raw} in the environment"
    try:
        size = int(raw)
    except ValueError:
        return Decision(None, source)
    return Decision(size // 1024 if size % 1024 == 0 else None, source)


def decide_mmap_threshold(kib: int | None, source: str) -> Decision:
    """The process's mmap threshold: fixed at `kib` KiB (0: glibc's adaptive one, None:
    `DEFAULT_KIB`) by the first call of the process; `source` says who asks (shown in the
    warning of a later, different request). A later call changes nothing: one that asks for
    another value (None asks for nothing) gets a one-line warning on stderr, once per value."""
    global _decision
    if _decision is None:
        decision = environment_decision()
        if decision is None:
            decision = Decision(DEFAULT_KIB if kib is None else kib, source)
            if decision.kib:
                apply(decision.kib)
        _decision = decision
    if kib is not None and kib != _decision.kib and (kib, _decision) not in _warned:
        _warned.add((kib, _decision))
        print(
            f"prefalign: warning: {source} asks for an mmap threshold of "
            f"{f'{kib} KiB' if kib else '0 (off)'}, but this process's is "
            f"{_decision.describe()}: glibc's threshold is process-wide and cannot be undone, "
            "so this run keeps it (run it in a fresh process to change it)",
            file=sys.stderr,
        )
    return _decision


def apply(kib: int) -> None:
    global _applied
    libc = glibc()
    if libc is None:
        return
    if not libc.mallopt(ctypes.c_int(M_MMAP_THRESHOLD), ctypes.c_int(kib * 1024)):
        raise ValueError(f"glibc refused an mmap threshold of {kib} KiB")
    _applied = kib


def set_mmap_threshold(kib: int) -> bool:
    """Decide the process's threshold as `kib` KiB (0: leave glibc's adaptive one), as
    `decide_mmap_threshold` does. Returns whether prefalign fixed a threshold (not the
    environment, not glibc's adaptive one)."""
    decision = decide_mmap_threshold(kib, "set_mmap_threshold")
    return bool(decision.kib) and ENV_THRESHOLD not in decision.source and glibc() is not None


@contextlib.contextmanager
def transient_heap() -> Iterator[None]:
    """Serve large buffers from glibc's heap inside the block, whatever threshold is fixed, then
    fix it again: for a phase whose buffers all die inside it, such as a forward pass without
    autograd (each layer's buffers are freed before the next layer's are made), which then
    reuses the same heap blocks layer after layer instead of mapping and faulting in every
    buffer afresh (a no-grad SmolLM2-135M forward over 4 short pairs: 80 k page faults and
    0.54 CPU-s against 20 k and 0.46 CPU-s, the resident size unchanged within 40 MB). The
    reuse needs glibc's trim threshold above the phase's buffers, or the freed top of the heap
    is handed back between layers: glibc raises it itself when a large mapped block is freed
    before the threshold is fixed, as loading a model does. Does nothing where no threshold is
    fixed by this module (glibc's adaptive one already reuses the heap)."""
    applied = _applied
    libc = glibc() if applied else None
    if libc is None:
        yield
        return
    libc.mallopt(ctypes.c_int(M_MMAP_THRESHOLD), ctypes.c_int(MAX_THRESHOLD_KIB * 1024))
    try:
        yield
    finally:
        libc.mallopt(ctypes.c_int(M_MMAP_THRESHOLD), ctypes.c_int(applied * 1024))
