"""The offline proposer: evolutionary search over objective expressions, no LLM needed.

Parents are drawn by tournament on archive fitness among the registry's objectives (seeds)
and earlier offline candidates; children come from mutation and crossover (expressions.py)
and are emitted as code, so they pass through the same sandbox as an LLM's proposals.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

from prefalign.discovery.archive import Archive, scored
from prefalign.discovery.candidate import Candidate, ProposalError, code_hash
from prefalign.discovery.export import compile_objective
from prefalign.discovery.expressions import (
    Genome,
    crossover,
    mutate,
    registry_seeds,
    render,
    within_limits,
)
from prefalign.discovery.sandbox_worker import fingerprint

MAX_TRIES = 200


class _View:
    """Some of an archive's records, with the archive's query methods."""

    def __init__(self, records: list[dict[str, Any]]) -> None:
        self.records = records

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.records)

    def scored(self) -> list[dict[str, Any]]:
        return scored(self.records)


def _behaviour(code: str, call_params: dict[str, Any] | None) -> str | None:
    """The fingerprint of our own grammar's code (None for code that no longer compiles)."""
    try:
        return fingerprint(compile_objective(code), call_params)
    except ValueError:
        return None


def baseline_codes() -> dict[str, str]:
    """The registry's pairwise objectives (dpo, hinge, ipo, discopop, cell, padll) as code."""
    return {name: render(genome, name) for name, genome in registry_seeds().items()}


class OfflineProposer:
    """Evolutionary search; deterministic given `seed` and the archive's contents.

    The proposal for slot s of generation g draws from a random stream of its own, seeded by
    (seed, g, s), with parents from the records of earlier generations only, avoiding what
    slots < s of generation g proposed: a run resumed inside a generation proposes exactly
    what the uninterrupted run did.
    """

    origin = "offline"

    def __init__(
        self,
        seed: int = 0,
        tournament: int = 3,
        crossover_rate: float = 0.3,
        call_params: dict[str, Any] | None = None,
    ) -> None:
        self.seed = seed
        self.tournament = tournament
        self.crossover_rate = crossover_rate
        # How the fitness will call a candidate (see run_discovery): children that would compute
        # a loss already in the archive are skipped, not proposed.
        self.call_params = call_params
        self._seed_behaviours: set[str | None] | None = None  # computed on first use

    def propose(
        self,
        archive: Archive,
        n: int,
        *,
        generation: int | None = None,
        slots: Sequence[int] | None = None,
    ) -> list[Candidate | ProposalError]:
        if generation is None:  # called outside the loop: the next generation, slots 0..n-1
            generation = 1 + max((r.get("generation", -1) for r in archive), default=-1)
        slots = list(range(n)) if slots is None else list(slots)[:n]
        earlier = _View([r for r in archive if r.get("generation", -1) < generation])
        pool = self._pool(earlier)
        seen = {r.get("code_hash") for r in earlier} | self._behaviours(earlier)
        # What this generation's recorded slots proposed (a resumed run): avoided as before.
        for r in archive:
            mine = r.get("origin") == self.origin and r.get("code")
            if mine and r.get("generation") == generation:
                seen.add(r.get("code_hash"))
                seen.add(_behaviour(r["code"], self.call_params))
        out: list[Candidate | ProposalError] = []
        for slot in slots:
            rng = random.Random(f"{self.seed}:{generation}:{slot}")
            candidate = self._child(pool, seen, rng)
            if candidate is None:
                out.append(ProposalError("no new expression found", origin=self.origin))
                continue
            seen.add(candidate.code_hash)
            out.append(candidate)
        return out

    def _behaviours(self, archive: Archive | _View) -> set[str]:
        """Fingerprints of the archive's objectives and of the registry seeds."""
        if self._seed_behaviours is None:
            self._seed_behaviours = {
                fingerprint(compile_objective(render(g, name)), self.call_params)
                for name, g in registry_seeds().items()
            }
        return ({r["behaviour"] for r in archive if r.get("behaviour")} | self._seed_behaviours) - {
            None
        }

    def _pool(self, archive: Archive | _View) -> list[tuple[str, Genome, float | None]]:
        """(name, genome, fitness or None) of the seeds and of every scored offline candidate."""
        fitness_by_hash = {r["code_hash"]: r["fitness"] for r in archive.scored()}
        pool = [
            (name, genome, fitness_by_hash.get(code_hash(render(genome, name))))
            for name, genome in registry_seeds().items()
        ]
        for r in archive.scored():
            genome = (r.get("meta") or {}).get("genome")
            if genome is None:
                continue
            try:
                pool.append((r["name"], Genome.from_json(genome), r["fitness"]))
            except (ValueError, TypeError, KeyError):
                continue  # a hand-edited or foreign record: not a parent
        return pool

    def _select(
        self, pool: list[tuple[str, Genome, float | None]], rng: random.Random
    ) -> tuple[str, Genome]:
        """Tournament: the fittest of a few random entries (unscored ones lose to scored ones)."""
        entrants = [rng.choice(pool) for _ in range(self.tournament)]
        best = max(entrants, key=lambda e: float("-inf") if e[2] is None else e[2])
        return best[0], best[1]

    def _child(
        self, pool: list[tuple[str, Genome, float | None]], seen: set[Any], rng: random.Random
    ) -> Candidate | None:
        for _ in range(MAX_TRIES):
            name_a, parent = self._select(pool, rng)
            parents = [name_a]
            if rng.random() < self.crossover_rate:
                name_b, other = self._select(pool, rng)
                parent = crossover(parent, other, rng)
                parents.append(name_b)
            child, operator = mutate(parent, rng)
            if not within_limits(child):
                continue
            draft = render(child, "candidate")
            digest = code_hash(draft)[:8]
            name = f"evo_{digest}"
            code = render(child, name)
            if code_hash(code) in seen:
                continue
            # Our own grammar's code, so it may run here: a new expression of a known loss
            # (a zero weight, a mixture of one term with itself) is not a new candidate.
            behaviour = _behaviour(code, self.call_params)
            if behaviour is not None and behaviour in seen:
                continue
            seen.add(behaviour)
            how = "crossover of " + " and ".join(parents) if len(parents) == 2 else f"{parents[0]}"
            return Candidate(
                name=name,
                code=code,
                thought=f"{operator} mutation of {how}",
                origin=self.origin,
                meta={"genome": child.to_json(), "parents": parents, "operator": operator},
            )
        return None
