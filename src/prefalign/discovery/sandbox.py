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

import json
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

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


class _WorkerGone(Exception):
    pass


class _WallClock(Exception):
    pass


def _limit_child(address_space: int) -> None:
    """preexec_fn: runs in the child between fork and exec; only setrlimit calls, no imports."""
    cpu_hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    resource.setrlimit(resource.RLIMIT_CPU, (STARTUP_CPU_S, cpu_hard))
    resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (MAX_FILE_BYTES, MAX_FILE_BYTES))


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
        self._proc: subprocess.Popen[bytes] | None = None
        self._stdout = b""
        self._stderr = b""

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
        if self._proc is not None:
            proc, self._proc = self._proc, None
            _kill_group(proc)  # the worker keeps no state worth a polite shutdown
        shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------ child process

    def _check_dynamic(self, code: str, function: str, call_params: dict[str, Any] | None) -> SandboxResult:
        proc = self._worker()
        request = {"code": code, "function": function, "cpu_s": self.limits.cpu_s, "call_params": call_params}
        try:
            self._send(proc, request)
            reply = json.loads(self._read_line(proc, self.limits.timeout_s))
        except _WallClock:
            self._discard(proc)
            return SandboxResult(
                False, f"wall-clock time limit exceeded ({self.limits.timeout_s:g} s)", ["timeout"]
            )
        except _WorkerGone:
            return self._death_result(self._discard(proc))
        return SandboxResult(
            bool(reply["ok"]), reply.get("reason"), list(reply.get("flags", [])), reply.get("fingerprint")
        )

    def _worker(self) -> subprocess.Popen[bytes]:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        cap = (self.limits.memory_mb + STARTUP_ADDRESS_SPACE_MB) * 2**20
        env = {
            "PATH": os.defpath,
            "HOME": str(self.root),
            "TMPDIR": str(self.root),
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "LC_ALL": "C.UTF-8",
        }
        self._stdout, self._stderr = b"", b""
        proc = subprocess.Popen(
            [sys.executable, "-I", "-B", str(WORKER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=self.root,
            env=env,
            start_new_session=True,  # its own process group: one killpg ends everything
            preexec_fn=partial(_limit_child, cap),
        )
        config = {"builtins": sorted(SAFE_BUILTINS), "memory_mb": self.limits.memory_mb}
        try:
            self._send(proc, config)
            ready = json.loads(self._read_line(proc, self.limits.startup_timeout_s))
        except (_WallClock, _WorkerGone, ValueError):
            self._discard(proc)
            raise SandboxError(
                f"sandbox worker failed to start: {self._stderr_tail() or 'no output'}"
            ) from None
        if not ready.get("ready"):
            self._discard(proc)
            raise SandboxError(f"sandbox worker sent {ready!r} instead of ready")
        self._proc = proc
        return proc

    def _send(self, proc: subprocess.Popen[bytes], message: dict) -> None:
        assert proc.stdin is not None
        try:
            proc.stdin.write(json.dumps(message).encode() + b"\n")
            proc.stdin.flush()
        except OSError:
            raise _WorkerGone from None

    def _read_line(self, proc: subprocess.Popen[bytes], timeout_s: float) -> str:
        """The child's next protocol line; drains stderr meanwhile so the child never blocks."""
        assert proc.stdout is not None and proc.stderr is not None
        out, err = proc.stdout.fileno(), proc.stderr.fileno()
        open_fds = [out, err]
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._stdout:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _WallClock
            ready, _, _ = select.select(open_fds, [], [], remaining)
            for fd in ready:
                chunk = os.read(fd, 65536)
                if fd == err:
                    self._stderr = (self._stderr + chunk)[-4096:]
                    if not chunk:
                        open_fds.remove(err)
                elif not chunk:
                    raise _WorkerGone
                else:
                    self._stdout += chunk
        line, _, self._stdout = self._stdout.partition(b"\n")
        return line.decode()

    def _discard(self, proc: subprocess.Popen[bytes]) -> int:
        """Kill the child's process group; return its exit status."""
        _kill_group(proc)
        if proc is self._proc:
            self._proc = None
        return proc.returncode

    def _death_result(self, returncode: int) -> SandboxResult:
        if returncode == -signal.SIGXCPU:
            return SandboxResult(
                False, f"CPU time limit exceeded ({self.limits.cpu_s:g} s)", ["cpu_limit"]
            )
        if returncode < 0:
            what = f"signal {signal.Signals(-returncode).name}"
        else:
            what = f"exit status {returncode}"
        tail = self._stderr_tail()
        return SandboxResult(
            False,
            f"sandbox process died ({what}; its memory limit is {self.limits.memory_mb} MB)"
            + (f": {tail}" if tail else ""),
            ["crashed"],
        )

    def _stderr_tail(self) -> str:
        lines = self._stderr.decode(errors="replace").strip().splitlines()
        return lines[-1][:300] if lines else ""


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            try:
                pipe.close()
            except OSError:
                pass


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
