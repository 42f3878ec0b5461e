"""A child process under rlimits that answers JSON requests, one per line, against a wall clock.

Both the sandbox check (`sandbox.py`) and the proxy training of candidates (`proxy.py`) run
candidate code in such a child:
- its own process group (one killpg ends it and anything it started), a given cwd and env;
- rlimits set between fork and exec: an address-space cap, a CPU limit for start-up, no core
  files, optionally a file-size cap; the child tightens both once it has started (the worker
  scripts set a per-request CPU limit and cap memory at what they mapped plus a budget);
- the parent enforces each request's wall clock and reads deaths by signal (SIGXCPU: the CPU
  limit).
Limits are POSIX rlimits: this needs Linux (or another POSIX system, where the address-space
cap may not be enforced).
"""

from __future__ import annotations

import json
import os
import resource
import select
import signal
import subprocess
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any


class WorkerGone(Exception):
    """The child closed its output or died."""


class WallClock(Exception):
    """The child did not answer in time."""


class StartFailed(Exception):
    """The child did not start; the message is the tail of its stderr."""


def _limit_child(address_space: int, startup_cpu_s: int, max_file_bytes: int | None) -> None:
    """preexec_fn: runs in the child between fork and exec; only setrlimit calls, no imports."""
    cpu_hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    resource.setrlimit(resource.RLIMIT_CPU, (startup_cpu_s, cpu_hard))
    resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if max_file_bytes is not None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))


class ConfinedProcess:
    """One child: start it with a config line (it answers {"ready": true}), then `request`."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        cwd: Path,
        env: Mapping[str, str],
        address_space_bytes: int,
        startup_cpu_s: int,
        max_file_bytes: int | None,
        config: dict[str, Any],
        startup_timeout_s: float,
    ) -> None:
        self._stdout = b""
        self._stderr = b""
        self.proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=dict(env),
            start_new_session=True,  # its own process group: one killpg ends everything
            preexec_fn=partial(_limit_child, address_space_bytes, startup_cpu_s, max_file_bytes),
        )
        try:
            ready = self.request(config, startup_timeout_s)
        except (WallClock, WorkerGone, ValueError):
            self.kill()
            raise StartFailed(self.stderr_tail() or "no output") from None
        if not ready.get("ready"):
            self.kill()
            raise StartFailed(f"the worker sent {ready!r} instead of ready")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def request(self, message: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """Send one JSON line, return the JSON answer; WallClock or WorkerGone otherwise."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(message).encode() + b"\n")
            self.proc.stdin.flush()
        except OSError:
            raise WorkerGone from None
        return json.loads(self._read_line(timeout_s))

    def _read_line(self, timeout_s: float) -> str:
        """The child's next protocol line; drains stderr meanwhile so the child never blocks."""
        import time

        proc = self.proc
        assert proc.stdout is not None and proc.stderr is not None
        out, err = proc.stdout.fileno(), proc.stderr.fileno()
        open_fds = [out, err]
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._stdout:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WallClock
            ready, _, _ = select.select(open_fds, [], [], remaining)
            for fd in ready:
                chunk = os.read(fd, 65536)
                if fd == err:
                    self._stderr = (self._stderr + chunk)[-4096:]
                    if not chunk:
                        open_fds.remove(err)
                elif not chunk:
                    raise WorkerGone
                else:
                    self._stdout += chunk
        line, _, self._stdout = self._stdout.partition(b"\n")
        return line.decode()

    def kill(self) -> int:
        """Kill the child's process group; return its exit status."""
        proc = self.proc
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
        return proc.returncode

    def stderr_tail(self) -> str:
        lines = self._stderr.decode(errors="replace").strip().splitlines()
        return lines[-1][:300] if lines else ""


def describe_death(returncode: int, cpu_s: float, memory_mb: int, tail: str) -> tuple[str, str]:
    """(reason, flag) for a child that died while running a candidate."""
    if returncode == -signal.SIGXCPU:
        return f"CPU time limit exceeded ({cpu_s:g} s)", "cpu_limit"
    if returncode < 0:
        what = f"signal {signal.Signals(-returncode).name}"
    else:
        what = f"exit status {returncode}"
    reason = f"the confined process died ({what}; its memory limit is {memory_mb} MB)"
    return reason + (f": {tail}" if tail else ""), "crashed"
