"""The discovery loop with the offline proposer: fitness recorded, determinism, resume; and a
discovered objective used through the registry and the user-objective loader."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from prefalign import objectives
from prefalign.discovery import (
    INFEASIBLE,
    Archive,
    Candidate,
    FitnessCache,
    FitnessResult,
    OfflineProposer,
    ProposalError,
    Sandbox,
    baseline_codes,
    compile_objective,
    config_hash,
    register_objective,
    run_discovery,
    save_objective,
    score,
    synthetic_fitness,
)
from prefalign.discovery.llm import archive_prompt


class CountingFitness:
    """synthetic_fitness, counting its calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, candidate: Candidate) -> FitnessResult:
        self.calls.append(candidate.name)
        return synthetic_fitness(candidate)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory):
    """One sandbox (one child process) for the module: each spawn imports torch."""
    with Sandbox(workdir=tmp_path_factory.mktemp("sandbox")) as s:
        yield s


def offline_run(
    sandbox: Sandbox, path: Path, generations: int, n: int = 4, resume: bool = False, **kw
) -> tuple[Archive, CountingFitness]:
    fitness = CountingFitness()
    archive = run_discovery(
        OfflineProposer(seed=7), fitness, generations=generations, candidates_per_generation=n,
        archive_path=path, resume=resume, sandbox=sandbox, log=lambda s: None, **kw,
    )  # fmt: skip
    return archive, fitness


@pytest.fixture(scope="module")
def offline_archive(
    sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Archive, CountingFitness]:
    path = tmp_path_factory.mktemp("offline") / "archive.jsonl"
    return offline_run(sandbox, path, generations=3, baselines=baseline_codes())


def test_offline_proposer_finds_valid_candidates_every_generation(offline_archive) -> None:
    archive, fitness = offline_archive
    records = archive.load()
    assert len(records) == 6 + 3 * 4
    baselines = [r for r in records if r["generation"] == -1]
    assert {r["name"] for r in baselines} == {"dpo", "hinge", "ipo", "discopop", "cell", "padll"}
    assert all(r["valid"] and math.isfinite(r["fitness"]) for r in baselines)
    for generation in range(3):
        rows = [r for r in records if r["generation"] == generation]
        assert [r["index"] for r in rows] == [0, 1, 2, 3]
        valid = [r for r in rows if r["valid"]]
        assert valid, f"no valid candidate in generation {generation}"
        for r in valid:
            assert math.isfinite(r["fitness"]) and {"gold", "kl"} <= set(r["metrics"])
            assert r["origin"] == "offline" and r["meta"]["genome"]
        for r in rows:
            assert r["valid"] or r["reason"]
    # every valid candidate was scored exactly once (no duplicates were proposed)
    assert len(fitness.calls) == sum(r["valid"] for r in records)
    assert len({r["code_hash"] for r in records}) == len(records)
    # the fitness is a real optimisation: objectives differ
    assert len({round(r["fitness"], 6) for r in archive.scored()}) > 5
    board = archive.leaderboard(5)
    assert [row["rank"] for row in board] == [1, 2, 3, 4, 5]
    assert board == sorted(board, key=lambda row: -row["fitness"])


def test_offline_proposals_compute_losses_not_seen_before(sandbox: Sandbox, tmp_path: Path) -> None:
    # Called with beta passed (as the toy proxy does), many mutations of DPO only change the
    # default beta or add a zero-weight term; the proposer must skip those.
    called = {"beta": 0.1}
    archive = run_discovery(
        OfflineProposer(seed=0, call_params=called), CountingFitness(), generations=3,
        candidates_per_generation=4, archive_path=tmp_path / "a.jsonl", baselines=baseline_codes(),
        sandbox=sandbox, call_params=called, log=lambda s: None,
    )  # fmt: skip
    records = archive.load()
    behaviours = [r["behaviour"] for r in records if r.get("behaviour")]
    assert len(behaviours) >= 6 + 3 * 2 and len(behaviours) == len(set(behaviours))
    assert not any(r.get("same_behaviour_as") for r in records)


def test_offline_proposer_is_deterministic_for_a_seed(offline_archive) -> None:
    archive, _ = offline_archive
    first = OfflineProposer(seed=7).propose(archive, 4)
    again = OfflineProposer(seed=7).propose(archive, 4)
    other = OfflineProposer(seed=8).propose(archive, 4)
    assert all(isinstance(c, Candidate) for c in first)
    assert [c.code for c in first] == [c.code for c in again]
    assert [c.code for c in first] != [c.code for c in other]
    known = {r["code_hash"] for r in archive}
    assert not any(c.code_hash in known for c in first)  # always something new


def test_resume_continues_without_recomputing(sandbox: Sandbox, tmp_path: Path) -> None:
    path = tmp_path / "resumed" / "archive.jsonl"
    _, fitness_a = offline_run(sandbox, path, generations=2, n=3)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="resume"):
        offline_run(sandbox, path, generations=3, n=3)
    archive, fitness_b = offline_run(sandbox, path, generations=3, n=3, resume=True)
    assert path.read_bytes().startswith(before)  # earlier records untouched
    records = archive.load()
    assert [(r["generation"], r["index"]) for r in records] == [
        (g, i) for g in range(3) for i in range(3)
    ]
    new = records[6:]
    assert len(fitness_b.calls) == sum(r["valid"] for r in new)  # only generation 2 was scored
    assert not set(fitness_b.calls) & set(fitness_a.calls)
    # resuming proposes what an uninterrupted run proposes
    straight, _ = offline_run(sandbox, tmp_path / "straight" / "archive.jsonl", generations=3, n=3)
    assert [r["code"] for r in straight.load()] == [r["code"] for r in records]
    # resuming a finished run does nothing
    _, fitness_c = offline_run(sandbox, path, generations=3, n=3, resume=True)
    assert fitness_c.calls == [] and path.read_bytes().count(b"\n") == 9


def test_a_torn_last_line_is_recomputed_on_resume(sandbox: Sandbox, tmp_path: Path) -> None:
    path = tmp_path / "archive.jsonl"
    offline_run(sandbox, path, generations=1, n=2)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + lines[1][:40])  # a crash in the middle of the second record
    archive, fitness = offline_run(sandbox, path, generations=1, n=2, resume=True)
    assert [(r["generation"], r["index"]) for r in archive.load()] == [(0, 0), (0, 1)]
    assert len(path.read_text().splitlines()) == 3  # the torn line stays, sealed and ignored
    assert len(fitness.calls) <= 1


class ScriptedProposer:
    """Proposes fixed candidates and errors (to test how the loop records each)."""

    def __init__(self, proposals: list) -> None:
        self.proposals = proposals

    def propose(self, archive: Archive, n: int) -> list:
        out, self.proposals = self.proposals[:n], self.proposals[n:]
        return out


def test_loop_records_fitness_failures_and_reuses_duplicates(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    dpo = baseline_codes()["dpo"]
    hinge = baseline_codes()["hinge"]
    calls: list[str] = []

    def fitness(candidate: Candidate) -> FitnessResult:
        calls.append(candidate.name)
        if candidate.name == "boom":
            raise RuntimeError("training diverged")
        if candidate.name == "nan":
            return FitnessResult(float("nan"), {"gold": float("nan")})
        return FitnessResult(1.5, {"gold": 2.0, "kl": 5.0})

    proposer = ScriptedProposer([
        Candidate("a", dpo, origin="test"),
        Candidate("a_again", dpo + "\n# same code, new comment\n", origin="test"),
        Candidate("boom", hinge.replace("def hinge", "def boom"), origin="test"),
        Candidate(
            "nan",
            hinge.replace("def hinge", "def nan_loss").replace("relu(1 - z)", "relu(2 - z)"),
            origin="test",
        ),
        ProposalError("model said no", raw="no"),
    ])  # fmt: skip
    archive = run_discovery(
        proposer, fitness, generations=1, candidates_per_generation=6,
        archive_path=tmp_path / "a.jsonl", sandbox=sandbox, log=lambda s: None,
    )  # fmt: skip
    r = archive.load()
    assert calls == ["a", "boom", "nan"]
    assert r[0]["valid"] and r[0]["fitness"] == 1.5
    assert r[1]["fitness"] == 1.5 and r[1]["duplicate_of"] == [0, 0]
    assert r[2]["reason"] == "fitness evaluation failed: RuntimeError: training diverged"
    assert r[3]["reason"] == "non-finite fitness (nan)" and r[3]["metrics"] == {"gold": None}
    assert r[4]["reason"] == "model said no" and r[4]["flags"] == ["proposal_error"]
    assert r[5]["reason"] == "the proposer returned too few candidates"
    json.loads(json.dumps(r, allow_nan=False))  # strict JSON throughout


def test_same_loss_in_other_code_is_scored_once(sandbox: Sandbox, tmp_path: Path) -> None:
    dpo = baseline_codes()["dpo"]
    softplus = dpo.replace("def dpo", "def dpo_softplus").replace(
        "-F.logsigmoid(z)", "F.softplus(-z)"
    )
    halved = dpo.replace("def dpo", "def dpo_halved").replace(
        "-F.logsigmoid(z)", "-0.5 * F.logsigmoid(z)"
    )
    assert softplus != dpo and halved != dpo
    calls: list[str] = []

    def fitness(candidate: Candidate) -> FitnessResult:
        calls.append(candidate.name)
        return FitnessResult(float(len(calls)), {})

    proposer = ScriptedProposer([Candidate("softplus", softplus), Candidate("halved", halved)])
    archive = run_discovery(
        proposer, fitness, generations=1, candidates_per_generation=2,
        archive_path=tmp_path / "a.jsonl", baselines={"dpo": dpo}, sandbox=sandbox,
        log=lambda s: None,
    )  # fmt: skip
    base, twin, other = archive.load()
    assert calls == ["dpo", "halved"]  # softplus(-z) == -logsigmoid(z): not trained again
    assert (
        twin["same_behaviour_as"] == "dpo"
        and twin["duplicate_of"] == [-1, 0]
        and twin["fitness"] == 1.0
    )
    assert twin["behaviour"] == base["behaviour"] != other["behaviour"]
    assert [r["name"] for r in archive.leaderboard()] == [
        "halved",
        "dpo",
    ]  # one entry per behaviour
    assert archive.best_proposed()["name"] == "halved"
    # An LLM proposer is told, so it stops rewriting DPO.
    assert "computes exactly the same loss as 'dpo'" in archive_prompt(archive, [])


def test_fingerprint_follows_how_the_fitness_calls_the_objective(sandbox: Sandbox) -> None:
    dpo = baseline_codes()["dpo"]  # beta=0.1 by default
    other_default = dpo.replace("def dpo", "def dpo_b").replace("beta=0.1", "beta=0.05")
    # Called with the candidates' defaults, the two differ; with beta=0.1 passed, they are one.
    assert sandbox.check(dpo).fingerprint != sandbox.check(other_default).fingerprint
    called = {"beta": 0.1}
    assert (
        sandbox.check(dpo, called).fingerprint == sandbox.check(other_default, called).fingerprint
    )
    assert sandbox.check(dpo, {"beta": 0.3}).fingerprint != sandbox.check(dpo, called).fingerprint
    assert (
        sandbox.check(baseline_codes()["hinge"], called).fingerprint
        != sandbox.check(dpo, called).fingerprint
    )


# ---------------------------------------------------------------- using a discovered objective


def test_saved_objective_loads_with_the_user_objective_loader(tmp_path: Path) -> None:
    code = baseline_codes()["discopop"].replace("def discopop", "def found")
    candidate = Candidate(
        "found", code, thought="modulate the logistic loss with sigmoid(z / tau)", origin="offline"
    )
    spec = save_objective(candidate, tmp_path / "found.py")
    assert spec == f"{tmp_path / 'found.py'}:found"
    loaded = objectives.load_user_objective(spec)
    compiled = compile_objective(code)
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = -(5 + 50 * torch.rand(4, 32, generator=g))
    expected = compiled(pc, pr, rc, rr)
    torch.testing.assert_close(
        objectives.compute_loss(loaded, pc, pr, rc, rr), expected, rtol=0, atol=0
    )
    torch.testing.assert_close(expected, objectives.compute_loss("discopop", pc, pr, rc, rr))
    assert "objective: {code:" in (tmp_path / "found.py").read_text()
    registered = register_objective(candidate, name="test_discovered_found")
    assert objectives.get("test_discovered_found") is registered
    assert registered.params() == {"beta": 0.05}
    loss = objectives.compute_loss("test_discovered_found", pc, pr, rc, rr, beta=0.1)
    assert loss.shape == (32,) and torch.isfinite(loss).all()


# ---------------------------------------------------------------- fitness rule and cache


def test_score_rule() -> None:
    assert score(0.8, 0.5, "budget", budget=1.0) == 0.8
    assert score(0.8, 3.0, "budget", budget=1.0) == INFEASIBLE - 2.0
    assert score(0.8, 3.0, "budget", budget=1.0) < score(0.8, 2.0, "budget", budget=1.0) < -1e5
    assert score(0.8, 2.0, "penalty", penalty=0.1) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="budget"):
        score(0.0, 0.0, "other")  # type: ignore[arg-type]


def test_fitness_cache_keys_on_normalized_code_and_proxy_config(tmp_path: Path) -> None:
    calls = []

    def fitness(candidate: Candidate) -> FitnessResult:
        calls.append(candidate.name)
        return synthetic_fitness(candidate)

    config = {"task": "sentiment", "steps": 50}
    cache = FitnessCache(tmp_path / "cache.json")
    cached = cache.wrap(fitness, config)
    dpo = Candidate("dpo", baseline_codes()["dpo"])
    first = cached(dpo)
    reformatted = Candidate(
        "dpo2", "# a comment\n" + dpo.code.replace("    z = beta * rho", "    z = (beta * rho)")
    )
    assert cached(reformatted) == first and calls == ["dpo"]
    assert FitnessCache(tmp_path / "cache.json").wrap(fitness, config)(dpo) == first  # from disk
    FitnessCache(tmp_path / "cache.json").wrap(fitness, {**config, "steps": 60})(dpo)
    assert calls == ["dpo", "dpo"]  # another proxy config is another key
    assert config_hash({"a": 1, "b": 2}) == config_hash({"b": 2, "a": 1})


def test_synthetic_fitness_is_a_real_deterministic_optimisation() -> None:
    codes = baseline_codes()
    dpo = synthetic_fitness(Candidate("dpo", codes["dpo"]))
    assert dpo == synthetic_fitness(Candidate("dpo", codes["dpo"]))
    ipo = synthetic_fitness(Candidate("ipo", codes["ipo"]))
    assert dpo.fitness != ipo.fitness
    assert dpo.metrics["kl"] > 0 and 0 < dpo.metrics["gold"] < 1
    weaker = synthetic_fitness(Candidate("dpo", codes["dpo"]), steps=5)
    assert weaker.metrics["kl"] < dpo.metrics["kl"]  # more steps, more drift
