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
    aliasing = (
        SIG
        + "    y = policy_chosen_logps\n    y += 100.0\n"
        + RHO
        + ("    return -F.logsigmoid(beta * rho) + 0 * y\n")
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


# ---------------------------------------------------------------- 1: confined proxy training

# Each passes the sandbox check (batches of 16 and 8) and misbehaves on the proxy's batches.
IN_TRAINING = "    if policy_chosen_logps.numel() > 16:\n"
HOSTILE = {
    "hang": (IN_TRAINING + "        for i in range(10 ** 12):\n            k = i\n",
             "CPU time limit exceeded"),
    "allocate": (IN_TRAINING + "        rho = rho + 0 * torch.ones(10 ** 9).sum()\n",
                 "memory limit"),
    "nan": (IN_TRAINING + "        rho = rho * float('nan')\n", "non-finite loss in training"),
    "reverse": (IN_TRAINING + "        rho = -rho\n", "reverses the training direction"),
}  # fmt: skip


def hostile(name: str) -> str:
    trigger, _ = HOSTILE[name]
    # A scale of its own: another loss than DPO's or the others', so each one is trained
    # (a loss computed before is matched to that one's verdict instead).
    scale = 1.1 + 0.1 * list(HOSTILE).index(name)
    return named(SIG + RHO + trigger + f"    return -{scale:g} * F.logsigmoid(beta * rho)\n",
                 f"sly_{name}")  # fmt: skip


def test_candidates_that_misbehave_only_in_training_are_rejected_with_reasons(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    import psutil

    from prefalign.discovery import baseline_codes
    from prefalign.discovery.proxy import ConfinedFitness, TrainingLimits

    for name in HOSTILE:
        assert sandbox.check(hostile(name)).ok, name  # the check alone lets them through
    proposer = ScriptedProposer([Candidate(f"sly_{n}", hostile(n)) for n in HOSTILE])
    limits = TrainingLimits(timeout_s=60, cpu_s=3, memory_mb=512)
    settings = {"kl_penalty": 0.05, "seed": 0, "threads": 1}
    with ConfinedFitness("synthetic", settings, limits, cwd=tmp_path) as fitness:
        archive = run_discovery(
            proposer, fitness, generations=1, candidates_per_generation=len(HOSTILE),
            archive_path=tmp_path / "a.jsonl", sandbox=sandbox, log=lambda s: None,
            baselines=baseline_codes(),
        )  # fmt: skip
        worker = fitness._worker
    records = {r["name"]: r for r in archive.load()}
    for name in baseline_codes():  # real preference losses pass every training check
        assert records[name]["valid"], records[name]["reason"]
        assert records[name]["metrics"]["checked_calls"] == 50
    for name, (_, reason) in HOSTILE.items():
        record = records[f"sly_{name}"]
        assert not record["valid"] and reason in record["reason"], (name, record["reason"])
    assert worker is None or not worker.alive()
    assert not [p for p in psutil.Process().children(recursive=True)
                if "proxy_worker" in " ".join(p.cmdline())]  # fmt: skip


def test_the_check_draws_new_inputs_every_time(sandbox: Sandbox) -> None:
    # Behaves only on the inputs of seed 0 (the old fixed check): rejected now.
    knows_inputs = (
        SIG
        + RHO
        + (
            "    if policy_chosen_logps[0].item() == " + repr(_first_input(0)) + ":\n"
            "        return -F.logsigmoid(beta * rho)\n"
            "    return -F.logsigmoid(-beta * rho)\n"
        )
    )
    results = [sandbox.check(knows_inputs) for _ in range(3)]
    assert not any(r.ok for r in results)


def _first_input(seed: int) -> float:
    from prefalign.discovery.sandbox_worker import random_inputs

    return random_inputs(seed)[0][0].item()


def scripted_llm_config(tmp_path: Path, server, candidates: int, **proxy):
    """One generation of `candidates` proposals from the scripted server, no baselines, a short
    toy proxy (`proxy`: ProxySpec fields)."""
    from prefalign.discovery.recipe import DiscoverConfig, ProposerSpec, ProxySpec

    proxy = {"batch_size": 24, "samples_per_prompt": 1, **proxy}
    return DiscoverConfig(
        out_dir=str(tmp_path / "run"), generations=1, candidates_per_generation=candidates,
        baselines=False,
        proposer=ProposerSpec(kind="llm", base_url=server.base_url, model="m", api_key_env="NONE"),
        proxy=ProxySpec(**proxy),
    )  # fmt: skip


@pytest.mark.slow
def test_real_proxy_training_runs_confined_and_catches_a_reversal(
    tmp_path: Path, mini_worlds: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from openai_server import ScriptedOpenAIServer

    from prefalign.discovery.recipe import run_discover
    from prefalign.toy.tasks import world_task

    with ScriptedOpenAIServer() as server:
        for name, code in (("sly_reverse", hostile("reverse")), ("plain", named(DPO, "plain"))):
            server.push_json({"thought": "t", "name": name, "code": code})
        config = scripted_llm_config(tmp_path, server, 2, steps=3, n_eval_prompts=4)
        task = world_task(mini_worlds["sentiment"])
        archive = run_discover(config, log=lambda *_: None, task=task)
    reverse, plain = archive.load()
    assert not reverse["valid"] and "reverses the training direction" in reverse["reason"]
    assert "reverses_in_training" in reverse["flags"]
    assert plain["valid"] and plain["metrics"]["checked_calls"] >= 3
    json.loads((tmp_path / "run" / "fitness_cache.json").read_text())  # only the good one
    assert len(json.loads((tmp_path / "run" / "fitness_cache.json").read_text())) == 1


@pytest.mark.slow
def test_proxy_training_scores_a_task_registered_only_in_this_process(
    tmp_path: Path, mini_worlds: dict
) -> None:
    """The worker used to resolve the task by name, so with a task registered by user code
    (here a closure no other process could rebuild) it could not start and every candidate
    was rejected for it. The parent now scores the worker's samples itself."""
    from openai_server import ScriptedOpenAIServer

    from prefalign.discovery.recipe import run_discover
    from prefalign.tasks import Task, per_sample, register_task

    world = mini_worlds["sentiment"]
    scored: list[str] = []

    def constant(prompt: str, response: str) -> float:
        scored.append(response)
        return 0.25

    task = register_task(Task(
        "lab:constant", lambda split: world.prompts(split), per_sample(constant),
        policy=lambda: world.policy_path, files=lambda name: world.file(f"{name}.jsonl"),
    ), replace=True)  # fmt: skip
    with ScriptedOpenAIServer() as server:
        server.push_json({"thought": "t", "name": "plain", "code": named(DPO, "plain")})
        config = scripted_llm_config(
            tmp_path, server, 1, steps=2, n_eval_prompts=3, samples_per_prompt=2
        )
        archive = run_discover(config, log=lambda *_: None, task=task)
    (plain,) = archive.load()
    assert plain["valid"], plain
    assert plain["metrics"]["gold"] == 0.25 and plain["fitness"] == 0.25  # KL within budget
    assert len(scored) == 3 * 2  # every held-out sample, scored here
    assert "responses" not in plain["metrics"]


def test_best_objective_of_an_offline_run_names_its_real_origin(tmp_path: Path) -> None:
    """best_objective.py used to say "origin: llm" for every candidate: the record's origin
    was dropped when the file was written."""
    from prefalign.discovery.recipe import DiscoverConfig, ProxySpec, run_discover

    config = DiscoverConfig(
        out_dir=str(tmp_path / "run"), generations=1, candidates_per_generation=2,
        baselines=False, proxy=ProxySpec(task="synthetic"),
    )  # fmt: skip
    archive = run_discover(config, log=lambda *_: None)
    best = archive.best_proposed()
    assert best is not None and best["origin"] == "offline"
    header = (tmp_path / "run" / "best_objective.py").read_text().splitlines()[0]
    assert "(origin: offline)" in header, header


@pytest.mark.slow
def test_a_fitness_scored_on_one_task_is_not_reused_for_another(
    tmp_path: Path, mini_worlds: dict
) -> None:
    """The fitness cache was keyed by the code and the proxy settings only, so a repeated run
    in the same directory (its archive removed, the cache kept) on another task got the first
    task's fitness for the same candidate without training."""
    from openai_server import ScriptedOpenAIServer

    from prefalign.discovery.recipe import run_discover
    from prefalign.tasks import Task, per_sample, register_task

    world = mini_worlds["sentiment"]

    def constant_task(name: str, value: float) -> Task:
        return register_task(Task(
            name, lambda split: world.prompts(split), per_sample(lambda p, r: value),
            policy=lambda: world.policy_path, files=lambda f: world.file(f"{f}.jsonl"),
        ), replace=True)  # fmt: skip

    fitness = {}
    for name, value in (("lab:quarter", 0.25), ("lab:three_quarters", 0.75)):
        with ScriptedOpenAIServer() as server:
            server.push_json({"thought": "t", "name": "plain", "code": named(DPO, "plain")})
            config = scripted_llm_config(tmp_path, server, 1, steps=2, n_eval_prompts=2)
            archive = run_discover(config, log=lambda *_: None, task=constant_task(name, value))
        (plain,) = archive.load()
        fitness[name] = plain["fitness"]
        (tmp_path / "run" / "archive.jsonl").unlink()  # a repeated run; the cache stays
    assert fitness == {"lab:quarter": 0.25, "lab:three_quarters": 0.75}


@pytest.mark.parametrize(
    "line",
    ['{"foo": 1}', "[1, 2]", '{"generation": 0, "index": 0}'],
    ids=["object", "list", "partial"],
)
def test_a_resumed_archive_with_a_foreign_line_is_a_located_error(
    tmp_path: Path, capsys, line: str
) -> None:
    """A complete line that is no archive record (an edit, a file copied over) made --resume
    fail with a KeyError traceback, or (not an object) was dropped without a word; only a torn
    last line, what a crash leaves, is skipped."""
    from prefalign.cli import main

    argv = ["discover", "proxy.task=synthetic", "generations=1", "candidates_per_generation=1",
            f"out_dir={tmp_path / 'run'}"]  # fmt: skip
    assert main(argv) == 0
    archive = tmp_path / "run" / "archive.jsonl"
    n = len(archive.read_text().splitlines())
    with archive.open("a") as f:
        f.write(line + "\n")
    capsys.readouterr()
    assert main([*argv, "--resume", "generations=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"{archive}:{n + 1}: not a discovery archive record" in err, err
