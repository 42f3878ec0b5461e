"""Proxy training of candidates, confined: a fitness function that trains in a child process.

`ConfinedFitness` is a `fitness_fn(candidate) -> FitnessResult` for `run_discovery` that
sends each candidate to a worker (`proxy_worker.py`) under the same kinds of limits as the
sandbox check, sized for training: a per-candidate CPU limit, a memory cap, a wall clock
(the parent kills the worker's process group), the restricted globals, and behaviour checks
on every training batch. A candidate that breaks any of them raises `CandidateRejected` (the
loop records the reason); a killed worker is replaced for the next candidate. The worker sets
up once (imports, the toy world's policy) and trains many candidates.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import prefalign
from prefalign.discovery.candidate import Candidate
from prefalign.discovery.confined import (
    ConfinedProcess,
    StartFailed,
    WallClock,
    WorkerGone,
    describe_death,
)
from prefalign.discovery.fitness import CandidateRejected, FitnessResult
from prefalign.discovery.sandbox import SandboxError
from prefalign.discovery.static_check import check_static

# Address space for the interpreter, torch and transformers before the candidate's own budget
# (the worker tightens the cap to what it has mapped + memory_mb once it is set up).
STARTUP_ADDRESS_SPACE_MB = 16384
STARTUP_CPU_S = 600


@dataclass(frozen=True)
class TrainingLimits:
    """Per-candidate limits of the proxy training: wall clock, CPU time, memory beyond setup."""

    timeout_s: float = 900.0
    cpu_s: float = 600.0
    memory_mb: int = 4096
    startup_timeout_s: float = 600.0


class ConfinedFitness:
    """Train each candidate in the worker; use as a context manager (the worker goes away).

    `kind="synthetic"`: `settings` holds kl_penalty and seed; `kind="toy"`: proxy (the
    ProxySpec as a dict), policy_path, pairs_path, prompts and out_dir, and `score` turns the
    worker's metrics (KL and held-out responses) into the fitness here, in this process, where
    the task's gold reward lives.
    """

    def __init__(
        self,
        kind: Literal["synthetic", "toy"],
        settings: dict[str, Any],
        limits: TrainingLimits | None = None,
        cwd: Path | None = None,
        score: Callable[[dict[str, Any]], FitnessResult] | None = None,
    ) -> None:
        if kind == "toy" and score is None:
            raise ValueError("the toy proxy needs `score` (the task's gold reward over samples)")
        self.kind = kind
        self.settings = dict(settings)
        self.limits = limits or TrainingLimits()
        self.cwd = Path(cwd or Path.cwd())
        self.score = score
        self._worker: ConfinedProcess | None = None

    def __enter__(self) -> ConfinedFitness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._worker is not None:
            worker, self._worker = self._worker, None
            worker.kill()

    def __call__(self, candidate: Candidate) -> FitnessResult:
        static = check_static(candidate.code)  # compiled through the restricted path only
        if not static.ok or static.function is None:
            raise CandidateRejected(f"objective code rejected: {static.reason}", "static")
        worker = self._running_worker()
        request = {"code": candidate.code, "function": static.function,
                   "key": candidate.code_hash[:12], "cpu_s": self.limits.cpu_s}  # fmt: skip
        try:
            reply = worker.request(request, self.limits.timeout_s)
        except WallClock:
            self._discard()
            raise CandidateRejected(
                f"proxy training exceeded its wall-clock limit ({self.limits.timeout_s:g} s)",
                "timeout",
            ) from None
        except (WorkerGone, ValueError):
            tail = worker.stderr_tail()
            reason, flag = describe_death(
                self._discard(), self.limits.cpu_s, self.limits.memory_mb, tail
            )
            raise CandidateRejected(f"in proxy training: {reason}", flag) from None
        if not reply.get("ok"):
            raise CandidateRejected(str(reply.get("reason")), str(reply.get("flag") or "training"))
        metrics = dict(reply.get("metrics") or {})
        if self.score is not None:
            return self.score(metrics)
        return FitnessResult(float(reply["fitness"]), metrics)

    def _running_worker(self) -> ConfinedProcess:
        if self._worker is not None and self._worker.alive():
            return self._worker
        # The worker imports this very prefalign, whatever the environment's path says.
        source_root = str(Path(prefalign.__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (source_root, env.get("PYTHONPATH")) if p)
        config = {"kind": self.kind, "memory_mb": self.limits.memory_mb, **self.settings}
        try:
            self._worker = ConfinedProcess(
                [sys.executable, "-B", "-m", "prefalign.discovery.proxy_worker"], cwd=self.cwd,
                env=env, address_space_bytes=(self.limits.memory_mb + STARTUP_ADDRESS_SPACE_MB)
                * 2**20, startup_cpu_s=STARTUP_CPU_S, max_file_bytes=None, config=config,
                startup_timeout_s=self.limits.startup_timeout_s,
            )  # fmt: skip
        except StartFailed as e:
            raise SandboxError(f"proxy-training worker failed to start: {e}") from None
        return self._worker

    def _discard(self) -> int:
        worker, self._worker = self._worker, None
        return worker.kill() if worker is not None else 0
