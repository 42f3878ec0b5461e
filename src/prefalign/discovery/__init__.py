"""Objective discovery: proposers write objective code, a sandbox checks it, a proxy scores it.

>>> from prefalign import discovery
>>> archive = discovery.run_discovery(  # doctest: +SKIP
...     discovery.OfflineProposer(seed=0), discovery.synthetic_fitness,
...     generations=3, candidates_per_generation=4, archive_path="runs/disc.jsonl",
...     baselines=discovery.baseline_codes())
>>> best = archive.leaderboard(1)  # doctest: +SKIP
"""

from prefalign.discovery.archive import Archive
from prefalign.discovery.candidate import Candidate, ProposalError, Proposer, code_hash
from prefalign.discovery.export import compile_objective, register_objective, save_objective
from prefalign.discovery.fitness import (
    INFEASIBLE,
    FitnessCache,
    FitnessResult,
    config_hash,
    score,
    synthetic_fitness,
)
from prefalign.discovery.llm import LLMProposer
from prefalign.discovery.loop import format_leaderboard, run_discovery
from prefalign.discovery.offline import OfflineProposer, baseline_codes
from prefalign.discovery.sandbox import (
    Sandbox,
    SandboxError,
    SandboxLimits,
    SandboxResult,
    check_candidate,
    check_candidates,
)
from prefalign.discovery.static_check import check_static

__all__ = [
    "INFEASIBLE",
    "Archive",
    "Candidate",
    "FitnessCache",
    "FitnessResult",
    "LLMProposer",
    "OfflineProposer",
    "ProposalError",
    "Proposer",
    "Sandbox",
    "SandboxError",
    "SandboxLimits",
    "SandboxResult",
    "baseline_codes",
    "check_candidate",
    "check_candidates",
    "check_static",
    "code_hash",
    "compile_objective",
    "config_hash",
    "format_leaderboard",
    "register_objective",
    "run_discovery",
    "save_objective",
    "score",
    "synthetic_fitness",
]
