"""Run candidate objectives in a separate, resource-limited process.

`check_candidate` / `Sandbox.check_many`: the static AST whitelist first (in this process, no
code runs), then dynamic checks in a child process (`sandbox_worker.py`) with
- a fresh temporary directory as cwd, HOME and TMPDIR, a minimal environment, `python -I`;
- rlimits: a per-candidate CPU limit (SIGXCPU ends the child), an address-space cap
  (allocations beyond it fail), no core files, no file larger than 1 MiB;
- a per-candidate wall clock enforced here, which kills the child's whole process group.
One child checks many candidates (torch is imported once); after a kill the next candidate
gets a fresh child. Limits are POSIX rlimits: this module needs Linux (or another POSIX system,
where the address-space cap may not be enforced).
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefalign.discovery.confined import (
    ConfinedProcess,
    StartFailed,
    WallClock,
    WorkerGone,
    describe_death,
)
from prefalign.discovery.static_check import SAFE_BUILTINS, check_static

WORKER = Path(__file__).with_name("sandbox_worker.py")
# Address space the interpreter and torch need before the candidate's own budget applies
# (the child tightens the cap to what it has mapped + memory_mb once torch is imported).
STARTUP_ADDRESS_SPACE_MB = 3072
STARTUP_CPU_S = 120
# torch's import probes TMPDIR with a tiny file, so file writes cannot be forbidden outright.
MAX_FILE_BYTES = 2**20


@dataclass(frozen=True)
class SandboxResult:
    """Verdict on one candidate; `reason` says why it was rejected, `flags` tag the finding."""

    ok: bool
    reason: str | None = None
    flags: list[str] = field(default_factory=list)
    fingerprint: str | None = None  # hash of the losses and gradients it computes (valid ones)


@dataclass(frozen=True)
class SandboxLimits:
    """Per-candidate limits: wall clock, CPU time, memory beyond what torch itself maps."""

    timeout_s: float = 10.0
    memory_mb: int = 1024
    cpu_s: float = 5.0
    startup_timeout_s: float = 120.0


class SandboxError(RuntimeError):
    """The sandbox itself failed (not the candidate): e.g. the worker could not start."""


class Sandbox:
    """A reusable checker; use as a context manager so the child and its directory go away.

    >>> with Sandbox(SandboxLimits(timeout_s=5)) as sandbox:  # doctest: +SKIP
    ...     results = sandbox.check_many([code_a, code_b])
    """

    def __init__(self, limits: SandboxLimits | None = None, workdir: Path | None = None) -> None:
        self.limits = limits or SandboxLimits()
        if workdir is not None:
            Path(workdir).mkdir(parents=True, exist_ok=True)
        self.root = Path(tempfile.mkdtemp(prefix="prefalign-sandbox-", dir=workdir))
        self._worker: ConfinedProcess | None = None

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check(self, code: str, call_params: dict[str, Any] | None = None) -> SandboxResult:
        """Static check, then dynamic checks in the child. `call_params`: the keyword arguments
        the fitness evaluation will pass (where the signature takes them), for the fingerprint."""
        static = check_static(code)
        if not static.ok:
            return SandboxResult(False, static.reason, ["static"])
        assert static.function is not None
        return self._check_dynamic(code, static.function, call_params)

    def check_many(self, codes: Sequence[str]) -> list[SandboxResult]:
        return [self.check(code) for code in codes]

    def close(self) -> None:
        """End the child and delete the sandbox directory."""
        if self._worker is not None:
            worker, self._worker = self._worker, None
            worker.kill()  # the worker keeps no state worth a polite shutdown
        shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------ child process

    def _check_dynamic(
        self, code: str, function: str, call_params: dict[str, Any] | None
    ) -> SandboxResult:
        worker = self._running_worker()
        request = {"code": code, "function": function, "cpu_s": self.limits.cpu_s,
                   "call_params": call_params, "seed": secrets.randbits(32)}  # fmt: skip
        try:
            reply = worker.request(request, self.limits.timeout_s)
        except WallClock:
            self._discard()
            return SandboxResult(
                False, f"wall-clock time limit exceeded ({self.limits.timeout_s:g} s)", ["timeout"]
            )
        except (WorkerGone, ValueError):
            tail = worker.stderr_tail()
            reason, flag = describe_death(
                self._discard(), self.limits.cpu_s, self.limits.memory_mb, tail
            )
            return SandboxResult(False, reason, [flag])
        return SandboxResult(
            bool(reply["ok"]), reply.get("reason"), list(reply.get("flags", [])),
            reply.get("fingerprint"),
        )  # fmt: skip

    def _running_worker(self) -> ConfinedProcess:
        if self._worker is not None and self._worker.alive():
            return self._worker
        env = {
            "PATH": os.defpath,
            "HOME": str(self.root),
            "TMPDIR": str(self.root),
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "LC_ALL": "C.UTF-8",
        }
        try:
            self._worker = ConfinedProcess(
                [sys.executable, "-I", "-B", str(WORKER)], cwd=self.root, env=env,
                address_space_bytes=(self.limits.memory_mb + STARTUP_ADDRESS_SPACE_MB) * 2**20,
                startup_cpu_s=STARTUP_CPU_S, max_file_bytes=MAX_FILE_BYTES,
                config={"builtins": sorted(SAFE_BUILTINS), "memory_mb": self.limits.memory_mb},
                startup_timeout_s=self.limits.startup_timeout_s,
            )  # fmt: skip
        except StartFailed as e:
            raise SandboxError(f"sandbox worker failed to start: {e}") from None
        return self._worker

    def _discard(self) -> int:
        """Kill the child; return its exit status."""
        worker, self._worker = self._worker, None
        return worker.kill() if worker is not None else 0


def check_candidate(
    code: str,
    *,
    timeout_s: float = 10,
    memory_mb: int = 1024,
    cpu_s: float = 5,
    workdir: Path | None = None,
) -> SandboxResult:
    """Check one candidate in a fresh sandbox (see `Sandbox` to check many with one child)."""
    return check_candidates(
        [code], timeout_s=timeout_s, memory_mb=memory_mb, cpu_s=cpu_s, workdir=workdir
    )[0]


def check_candidates(
    codes: Sequence[str],
    *,
    timeout_s: float = 10,
    memory_mb: int = 1024,
    cpu_s: float = 5,
    workdir: Path | None = None,
) -> list[SandboxResult]:
    """Check many candidates, one child process for all of them (a new one after each kill)."""
    limits = SandboxLimits(timeout_s=timeout_s, memory_mb=memory_mb, cpu_s=cpu_s)
    with Sandbox(limits, workdir) as sandbox:
        return sandbox.check_many(codes)
