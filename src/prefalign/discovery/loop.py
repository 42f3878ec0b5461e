"""The discovery loop: propose, sandbox-check, score, archive; resumable.

    generation g = 0 .. generations-1:
        proposals = proposer.propose(archive, n)            # code, or a ProposalError
        each: sandbox check -> fitness_fn -> one archive record (valid or with its reason)

Records are appended as soon as each candidate is done, so `resume=True` continues an
interrupted run where it stopped, skipping every (generation, index) already recorded.
Baselines (named code, e.g. the registry's objectives) are scored first as generation -1.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from prefalign.config import ConfigError
from prefalign.discovery.archive import Archive
from prefalign.discovery.candidate import Candidate, ProposalError, Proposer, code_hash
from prefalign.discovery.fitness import CandidateRejected, FitnessResult
from prefalign.discovery.sandbox import Sandbox, SandboxError, SandboxLimits
from prefalign.errors import RunDirError

BASELINE_GENERATION = -1


def run_discovery(
    proposer: Proposer,
    fitness_fn: Callable[[Candidate], FitnessResult],
    *,
    generations: int,
    candidates_per_generation: int,
    archive_path: str | Path,
    resume: bool = False,
    baselines: Mapping[str, str] | None = None,
    limits: SandboxLimits | None = None,
    workdir: Path | None = None,
    sandbox: Sandbox | None = None,
    call_params: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> Archive:
    """Run (or with `resume`, continue) a discovery run; return its archive.

    Candidates are checked in a Sandbox with `limits` under `workdir` (a temporary directory
    by default), or in `sandbox`, an open Sandbox to reuse (it stays open). `call_params` are
    the keyword arguments `fitness_fn` passes to objectives that take them (the proxy's beta):
    a candidate computing the same losses as an earlier one under that call reuses its fitness.
    """
    if generations < 0 or candidates_per_generation < 1:
        raise ConfigError("discovery needs generations >= 0 and candidates_per_generation >= 1")
    archive = Archive(archive_path)
    if len(archive) and not resume:
        raise RunDirError(
            f"{archive_path} already holds {len(archive)} records: pass resume=True "
            "(--resume) to continue that run, or choose a new archive path"
        )
    done = archive.done()
    with contextlib.nullcontext(sandbox) if sandbox else Sandbox(limits, workdir) as checker:
        evaluate = _Evaluator(archive, checker, fitness_fn, log, call_params)
        for index, (name, code) in enumerate((baselines or {}).items()):
            if (BASELINE_GENERATION, index) not in done:
                baseline = Candidate(name, code, "registry objective", origin="baseline")
                evaluate(baseline, BASELINE_GENERATION, index)
        for generation in range(generations):
            missing = [i for i in range(candidates_per_generation) if (generation, i) not in done]
            if not missing:
                continue
            log(f"generation {generation}: proposing {len(missing)} candidate(s)")
            proposals = _propose(proposer, archive, generation, missing)
            for index, proposal in zip(missing, proposals, strict=True):
                evaluate(proposal, generation, index)
    log(format_leaderboard(archive))
    return archive


def _propose(
    proposer: Proposer, archive: Archive, generation: int, slots: list[int]
) -> list[Candidate | ProposalError]:
    """The proposals for `slots` of `generation`; a proposer that fails yields errors."""
    try:
        parameters = inspect.signature(proposer.propose).parameters
        if "generation" in parameters and "slots" in parameters:
            made = proposer.propose(  # type: ignore[call-arg]
                archive, len(slots), generation=generation, slots=slots
            )
        else:
            made = proposer.propose(archive, len(slots))
        proposals = list(made)[: len(slots)]
    except Exception as e:  # a proposer's bug costs its proposals, not the run
        reason = f"the proposer failed: {type(e).__name__}: {e}"
        return [ProposalError(reason[:2000], origin=getattr(proposer, "origin", "unknown"))
                for _ in slots]  # fmt: skip
    while len(proposals) < len(slots):
        proposals.append(ProposalError("the proposer returned too few candidates"))
    return proposals


class _Evaluator:
    """Turns one proposal into one archive record."""

    def __init__(
        self,
        archive: Archive,
        sandbox: Sandbox,
        fitness_fn: Callable[[Candidate], FitnessResult],
        log: Callable[[str], None],
        call_params: dict[str, Any] | None = None,
    ) -> None:
        self.archive, self.sandbox, self.fitness_fn, self.log = archive, sandbox, fitness_fn, log
        self.call_params = call_params

    def __call__(
        self, proposal: Candidate | ProposalError, generation: int, index: int
    ) -> dict[str, Any]:
        start = time.time()
        if isinstance(proposal, ProposalError):
            record = _error_record(proposal)
        elif not isinstance(proposal, Candidate):
            what = type(proposal).__name__
            record = _error_record(ProposalError(f"the proposer returned a {what}"))
        else:
            try:
                record = self._candidate_record(proposal)
            except SandboxError:
                raise  # the sandbox itself is broken: every candidate would fail alike
            except Exception as e:  # any failure of one candidate is that candidate's
                why = f"evaluating the candidate failed: {type(e).__name__}: {e}"
                record = _rejected_record(proposal, why)
        record.update(generation=generation, index=index, time=start, seconds=time.time() - start)
        self.archive.append(_jsonable(record))
        self.log(
            f"[gen {generation} #{index}] {record['name'] or '(no candidate)'}: {_outcome(record)}"
        )
        return record

    def _candidate_record(self, candidate: Candidate) -> dict[str, Any]:
        record: dict[str, Any] = {
            "name": candidate.name,
            "code": candidate.code,
            "code_hash": candidate.code_hash,
            "thought": candidate.thought,
            "origin": candidate.origin,
            "meta": candidate.meta,
        }
        previous = self.archive.find(candidate.code_hash)
        if previous is not None:  # the same code again: reuse its verdict, do not retrain
            keys = ("valid", "reason", "flags", "fitness", "metrics")
            record.update({k: previous[k] for k in keys}, behaviour=previous.get("behaviour"))
            record["duplicate_of"] = [previous["generation"], previous["index"]]
            return record
        check = self.sandbox.check(candidate.code, self.call_params)
        record.update(
            valid=check.ok,
            reason=check.reason,
            flags=check.flags,
            fitness=None,
            metrics={},
            behaviour=check.fingerprint,
        )
        if not check.ok:
            return record
        twin = self.archive.find_behaviour(check.fingerprint)
        if twin is not None:  # other code, same loss and gradients: it would train the same way
            record.update({k: twin[k] for k in ("valid", "reason", "fitness", "metrics")})
            record.update(
                duplicate_of=[twin["generation"], twin["index"]], same_behaviour_as=twin["name"]
            )
            return record
        try:
            result = self.fitness_fn(candidate)
        except CandidateRejected as e:  # misbehaved in training, or ran past a limit
            record.update(valid=False, reason=e.reason, flags=[*record["flags"], e.flag])
            return record
        except Exception as e:  # a candidate that breaks training is a failed candidate
            record.update(valid=False, reason=f"fitness evaluation failed: {type(e).__name__}: {e}")
            return record
        record["metrics"] = dict(result.metrics)
        if not math.isfinite(result.fitness):
            record.update(valid=False, reason=f"non-finite fitness ({result.fitness})")
        else:
            record["fitness"] = float(result.fitness)
        return record


def _rejected_record(candidate: Candidate, reason: str) -> dict[str, Any]:
    code = candidate.code if isinstance(candidate.code, str) else repr(candidate.code)
    return {
        "name": str(candidate.name)[:200], "code": code, "code_hash": code_hash(code),
        "thought": str(candidate.thought)[:2000], "origin": str(candidate.origin),
        "valid": False, "reason": reason[:2000], "flags": ["evaluation_error"], "fitness": None,
        "metrics": {},
    }  # fmt: skip


def _error_record(error: ProposalError) -> dict[str, Any]:
    return {
        "name": "",
        "code": "",
        "code_hash": "",
        "thought": "",
        "origin": error.origin,
        "valid": False,
        "reason": error.message,
        "flags": ["proposal_error"],
        "fitness": None,
        "metrics": {"attempts": error.attempts},
        "raw": error.raw,
    }


def _outcome(record: dict[str, Any]) -> str:
    if record["valid"] and record.get("same_behaviour_as"):
        return (
            f"fitness {record['fitness']:.4g} (computes the same loss as "
            f"{record['same_behaviour_as']!r}; not retrained)"
        )
    if record["valid"]:
        return f"fitness {record['fitness']:.4g}"
    return f"rejected: {record['reason']}"


def _jsonable(value: Any) -> Any:
    """Non-finite floats become None and unknown objects strings: the archive is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    try:
        return _jsonable(float(value))  # numpy / torch scalars
    except (TypeError, ValueError):
        return str(value)


def format_leaderboard(archive: Archive, k: int = 10) -> str:
    """The best `k` objectives as a text table."""
    rows = archive.leaderboard(k)
    if not rows:
        return "leaderboard: no valid candidate yet"
    lines = [f"{'rank':>4}  {'fitness':>10}  {'origin':<9} {'gen':>4}  name"]
    for r in rows:
        lines.append(
            f"{r['rank']:>4}  {r['fitness']:>10.4g}  {r['origin']:<9} "
            f"{r['generation']:>4}  {r['name']}"
        )
    return "\n".join(lines)
