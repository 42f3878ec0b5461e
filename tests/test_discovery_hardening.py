"""Discovery under attack: oversized code, in-place writes, interrupted generations, and
candidates that behave in the check and misbehave while they train."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prefalign.discovery import (
    Archive,
    Candidate,
    FitnessResult,
    OfflineProposer,
    Sandbox,
    check_static,
    code_hash,
    compile_objective,
    run_discovery,
    synthetic_fitness,
)

SIG = (
    "def objective(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, "
    "reference_rejected_logps, beta=0.1):\n"
)
RHO = (
    "    rho = (policy_chosen_logps - reference_chosen_logps) - "
    "(policy_rejected_logps - reference_rejected_logps)\n"
)
DPO = SIG + RHO + "    return -F.logsigmoid(beta * rho)\n"


def named(code: str, name: str) -> str:
    return code.replace("def objective", f"def {name}")


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory):
    with Sandbox(workdir=tmp_path_factory.mktemp("sandbox")) as s:
        yield s


class ScriptedProposer:
    def __init__(self, proposals: list, fail: bool = False) -> None:
        self.proposals, self.fail = proposals, fail

    def propose(self, archive: Archive, n: int) -> list:
        if self.fail:
            raise RuntimeError("the proposer broke")
        out, self.proposals = self.proposals[:n], self.proposals[n:]
        return out


# ---------------------------------------------------------------- 2: size and depth bounds

LONG_SUM = SIG + "    return " + " + ".join(["0.001 * policy_chosen_logps"] * 400) + "\n"


def test_a_400_term_sum_is_a_recorded_rejection_and_the_generation_goes_on(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    assert len(code_hash(LONG_SUM)) == 64  # hashing never raises
    proposer = ScriptedProposer([
        Candidate("long_sum", LONG_SUM), Candidate("deep", SIG + "    return " + "(" * 300
                                                   + "policy_chosen_logps" + ")" * 300 + "\n"),
        Candidate("dpo", named(DPO, "dpo_again")),
    ])  # fmt: skip
    archive = run_discovery(
        proposer, synthetic_fitness, generations=1, candidates_per_generation=3,
        archive_path=tmp_path / "a.jsonl", sandbox=sandbox, log=lambda s: None,
    )  # fmt: skip
    long_sum, deep, dpo = archive.load()
    assert not long_sum["valid"] and "nested too deeply" in long_sum["reason"]
    assert not deep["valid"] and deep["reason"]
    assert dpo["valid"] and dpo["fitness"] is not None


def test_a_broken_proposer_or_evaluation_is_recorded_not_raised(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    archive = run_discovery(
        ScriptedProposer([], fail=True), synthetic_fitness, generations=1,
        candidates_per_generation=2, archive_path=tmp_path / "a.jsonl", sandbox=sandbox,
        log=lambda s: None,
    )  # fmt: skip
    records = archive.load()
    assert len(records) == 2
    assert all("the proposer failed: RuntimeError: the proposer broke" in r["reason"]
               for r in records)  # fmt: skip


# ---------------------------------------------------------------- 3: no writes to the inputs


@pytest.mark.parametrize(
    "line, reason",
    [
        ("    rho = torch.clamp(rho, -1, 1, out=rho)\n", "out= is not allowed"),
        ("    rho.clamp_(-1, 1)\n", "in-place method '.clamp_' is not allowed"),
        ("    policy_chosen_logps.add_(1.0)\n", "in-place method '.add_' is not allowed"),
    ],
)
def test_out_and_in_place_methods_are_rejected(line: str, reason: str) -> None:
    result = check_static(SIG + RHO + line + "    return -F.logsigmoid(beta * rho)\n")
    assert not result.ok and reason in (result.reason or "")


def test_candidates_get_copies_of_their_inputs() -> None:
    aliasing = SIG + "    y = policy_chosen_logps\n    y += 100.0\n" + RHO + (
        "    return -F.logsigmoid(beta * rho) + 0 * y\n"
    )
    fn = compile_objective(aliasing)
    inputs = [torch.full((4,), -5.0) for _ in range(4)]
    fn(*inputs)
    assert all(bool((t == -5.0).all()) for t in inputs)


# ---------------------------------------------------------------- 5: exact resume


class Interrupt(BaseException):
    """Stands for a kill: escapes every `except Exception`."""


def test_resume_inside_a_generation_proposes_what_the_uninterrupted_run_proposed(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    def run(path: Path, resume: bool = False, stop_after: int | None = None) -> Archive:
        calls = []

        def fitness(candidate: Candidate) -> FitnessResult:
            calls.append(candidate.name)
            if stop_after is not None and len(Archive(path)) >= stop_after:
                raise Interrupt
            return synthetic_fitness(candidate)

        return run_discovery(
            OfflineProposer(seed=3), fitness, generations=2, candidates_per_generation=5,
            archive_path=path, resume=resume, sandbox=sandbox, log=lambda s: None,
        )  # fmt: skip

    straight = [r["code_hash"] for r in run(tmp_path / "straight.jsonl").load()]
    path = tmp_path / "killed.jsonl"
    with pytest.raises(Interrupt):
        run(path, stop_after=7)
    interrupted = len(Archive(path))
    assert 5 < interrupted < 10  # stopped inside generation 1
    resumed = [r["code_hash"] for r in run(path, resume=True).load()]
    assert resumed == straight

