"""The LLM proposer against a real HTTP server speaking the OpenAI chat-completions protocol."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from openai_server import Reply, ScriptedOpenAIServer

from prefalign.discovery import (
    Archive,
    Candidate,
    LLMProposer,
    ProposalError,
    run_discovery,
    synthetic_fitness,
)
from prefalign.discovery.llm import build_messages, parse_reply

KEY_ENV = "PREFALIGN_TEST_LLM_KEY"
SIG = (
    "def {name}(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, "
    "reference_rejected_logps, beta=0.1):\n"
    "    rho = (policy_chosen_logps - reference_chosen_logps) - "
    "(policy_rejected_logps - reference_rejected_logps)\n"
)


def objective(name: str, expression: str) -> dict[str, str]:
    """A reply as the LLM is asked to give it."""
    code = SIG.format(name=name) + f"    return {expression}\n"
    return {"thought": f"try {expression}", "name": name, "code": code}


GOOD = objective("margin_dpo", "-F.logsigmoid(beta * rho)")
HINGE = objective("soft_hinge", "F.softplus(1 - beta * rho) ** 2")
MIXED = objective("mixed", "0.5 * torch.exp(-0.05 * rho) - 0.5 * F.logsigmoid(beta * rho)")
TANH = objective("tanh_margin", "1 - torch.tanh(beta * rho)")
SIGMOID = objective("sigmoid_margin", "torch.sigmoid(-beta * rho) - 0.1 * F.logsigmoid(beta * rho)")
MEAN = objective("mean_loss", "(-F.logsigmoid(beta * rho)).mean()")  # fails the sandbox


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(KEY_ENV, "sk-test")
    with ScriptedOpenAIServer() as s:
        yield s


def make_proposer(
    server: ScriptedOpenAIServer, sleeps: list[float] | None = None, **kw
) -> LLMProposer:
    kw = {"max_retries": 2, "timeout_s": 0.5, "backoff_s": 0.01, **kw}
    return LLMProposer(
        server.base_url, "scripted-model", api_key_env=KEY_ENV,
        sleep=(sleeps.append if sleeps is not None else lambda s: None), **kw,
    )  # fmt: skip


def propose_one(proposer: LLMProposer, tmp_path: Path) -> Candidate | ProposalError:
    (result,) = proposer.propose(Archive(tmp_path / "a.jsonl"), 1)
    return result


def test_good_reply_becomes_a_candidate(server: ScriptedOpenAIServer, tmp_path: Path) -> None:
    server.push_json(GOOD)
    candidate = propose_one(make_proposer(server), tmp_path)
    assert candidate == Candidate("margin_dpo", GOOD["code"], GOOD["thought"], "llm")
    (request,) = server.requests
    assert request.body["model"] == "scripted-model" and request.body["temperature"] == 0.8
    assert request.headers["authorization"] == "Bearer sk-test"
    assert "policy_chosen_logps" in request.prompt and '"code"' in request.prompt


def test_malformed_json_is_an_error_not_a_crash(
    server: ScriptedOpenAIServer, tmp_path: Path
) -> None:
    server.push_text('{"name": "x", "code": "def f(')  # cut off mid-string
    error = propose_one(make_proposer(server), tmp_path)
    assert isinstance(error, ProposalError)
    assert error.message.startswith("malformed reply: invalid JSON")
    assert error.raw == '{"name": "x", "code": "def f('
    assert len(server.requests) == 1  # a bad reply is fed back, not retried blindly


@pytest.mark.parametrize("status", [429, 500, 503])
def test_transient_http_errors_are_retried(
    server: ScriptedOpenAIServer, tmp_path: Path, status: int
) -> None:
    server.push(Reply.error(status), Reply.json(GOOD))
    sleeps: list[float] = []
    candidate = propose_one(make_proposer(server, sleeps), tmp_path)
    assert isinstance(candidate, Candidate) and candidate.name == "margin_dpo"
    assert len(server.requests) == 2 and sleeps == [0.01]


def test_timeout_is_retried(server: ScriptedOpenAIServer, tmp_path: Path) -> None:
    server.push_delay(3.0, then=Reply.json(MIXED))
    server.push_json(GOOD)
    proposer = make_proposer(server)
    candidate = propose_one(proposer, tmp_path)
    assert isinstance(candidate, Candidate) and candidate.name == "margin_dpo"
    assert proposer.attempts == 2 and len(server.requests) == 2


def test_retries_are_bounded_with_exponential_backoff(
    server: ScriptedOpenAIServer, tmp_path: Path
) -> None:
    for _ in range(4):
        server.push_status(429)
    server.push_json(GOOD)  # never reached
    sleeps: list[float] = []
    error = propose_one(make_proposer(server, sleeps, max_retries=3), tmp_path)
    assert isinstance(error, ProposalError) and error.attempts == 4
    assert error.message == "LLM request failed after 4 attempts: HTTP 429: scripted error 429"
    assert sleeps == [0.01, 0.02, 0.04]
    assert len(server.requests) == 4 and server.remaining == 1


def test_retry_after_header_is_honoured_up_to_the_cap(
    server: ScriptedOpenAIServer, tmp_path: Path
) -> None:
    server.push(Reply.error(429, {"retry-after": "0.5"}), Reply.json(GOOD))
    sleeps: list[float] = []
    propose_one(make_proposer(server, sleeps, max_backoff_s=0.3), tmp_path)
    assert sleeps == [0.3]


def test_client_errors_are_not_retried(server: ScriptedOpenAIServer, tmp_path: Path) -> None:
    server.push_status(401)
    error = propose_one(make_proposer(server), tmp_path)
    assert (
        isinstance(error, ProposalError)
        and "HTTP 401" in error.message
        and "not retried" in error.message
    )
    assert len(server.requests) == 1


def test_missing_api_key_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ValueError, match=KEY_ENV):
        LLMProposer("http://127.0.0.1:9/v1", "m", api_key_env=KEY_ENV)


def test_parse_reply_accepts_fenced_json_and_names_what_is_missing() -> None:
    fenced = "Here you go:\n```json\n" + json.dumps({**GOOD, "name": "my loss!"}) + "\n```"
    candidate = parse_reply(fenced)
    assert candidate.name == "my_loss" and candidate.code == GOOD["code"]
    with pytest.raises(ValueError, match="no 'code'"):
        parse_reply(json.dumps({"name": "x"}))
    with pytest.raises(ValueError, match="expected a JSON object"):
        parse_reply("[1, 2]")


def test_loop_with_scripted_llm_records_every_outcome(
    server: ScriptedOpenAIServer, tmp_path: Path
) -> None:
    server.push(
        # generation 0
        Reply.json(GOOD),                            # 0: a good candidate
        Reply.text("I think the best loss is DPO."),  # 1: no JSON at all
        Reply.json(MEAN),                            # 2: fails the sandbox (not per-pair)
        Reply.error(429), Reply.json(HINGE),         # 3: rate limited, then good
        # generation 1
        Reply.error(500), Reply.json(MIXED),         # 0: server error, then good
        Reply(delay_s=3.0, content=json.dumps(GOOD)), Reply.json(TANH),  # 1: timeout, then good
        Reply.error(429), Reply.error(429), Reply.error(429),  # 2: retries exhausted
        Reply.json(SIGMOID),                         # 3: good
    )  # fmt: skip
    archive_path = tmp_path / "archive.jsonl"
    lines: list[str] = []
    archive = run_discovery(
        make_proposer(server),
        synthetic_fitness,
        generations=2,
        candidates_per_generation=4,
        archive_path=archive_path,
        workdir=tmp_path / "sandbox",
        log=lines.append,
    )
    assert server.remaining == 0 and len(server.requests) == 13
    records = {(r["generation"], r["index"]): r for r in Archive(archive_path)}
    assert len(records) == 8 == len(archive)
    valid = {key: r["valid"] for key, r in records.items()}
    assert valid == {
        (0, 0): True, (0, 1): False, (0, 2): False, (0, 3): True,
        (1, 0): True, (1, 1): True, (1, 2): False, (1, 3): True,
    }  # fmt: skip
    for key, ok in valid.items():
        record = records[key]
        if ok:
            assert isinstance(record["fitness"], float) and record["reason"] is None
            assert record["origin"] == "llm" and record["metrics"]["kl"] >= 0
        else:
            assert record["fitness"] is None and record["reason"]
    assert records[(0, 1)]["reason"].startswith("malformed reply")
    assert records[(0, 1)]["raw"] == "I think the best loss is DPO."
    assert "expected a per-pair loss" in records[(0, 2)]["reason"]
    assert records[(0, 2)]["name"] == "mean_loss" and records[(0, 2)]["code"] == MEAN["code"]
    assert (
        records[(1, 2)]["reason"]
        == "LLM request failed after 3 attempts: HTTP 429: scripted error 429"
    )
    assert records[(1, 1)]["name"] == "tanh_margin"
    # the first request of generation 1 shows the proposer what happened in generation 0
    prompt = server.requests[5].prompt
    assert f"fitness {records[(0, 0)]['fitness']:.4g}" in prompt
    assert f"fitness {records[(0, 3)]['fitness']:.4g}" in prompt
    assert "malformed reply: invalid JSON" in prompt
    assert "expected a per-pair loss" in prompt
    assert GOOD["code"].strip() in prompt  # the best code so far, for the model to improve on
    # within a generation, later requests list the proposals not yet evaluated
    assert "not evaluated yet): margin_dpo" in server.requests[2].prompt
    assert any("rejected: malformed reply" in line for line in lines)


def test_build_messages_without_history() -> None:
    system, user = build_messages(Archive(Path("/nonexistent/archive.jsonl")))
    assert system["role"] == "system" and "torch.nn.functional" in system["content"]
    assert "No objectives have been evaluated yet." in user["content"]


def test_max_tokens_json_mode_and_the_no_key_form_reach_the_server(
    server: ScriptedOpenAIServer, tmp_path: Path
) -> None:
    server.push_json(GOOD)
    proposer = LLMProposer(server.base_url, "m", api_key_env="NONE", max_tokens=300,
                           json_mode=True)  # fmt: skip
    assert isinstance(propose_one(proposer, tmp_path), Candidate)
    (request,) = server.requests
    assert request.body["max_tokens"] == 300
    assert request.body["response_format"] == {"type": "json_object"}
    assert "authorization" not in {k.lower() for k in request.headers}


def test_garbled_200_is_a_failed_attempt_and_the_loop_goes_on(
    server: ScriptedOpenAIServer, tmp_path: Path
) -> None:
    server.push(Reply.raw(b"<html>upstream error</html>"), Reply.json(GOOD))
    for _ in range(3):
        server.push(Reply.raw(b'{"id": "x", "choices": [{"message": {"content": "trunc'))
    archive = run_discovery(
        make_proposer(server), synthetic_fitness, generations=1, candidates_per_generation=2,
        archive_path=tmp_path / "a.jsonl", workdir=tmp_path / "sb", log=lambda _: None,
    )  # fmt: skip
    first, second = archive.records
    assert first["valid"] and first["name"] == "margin_dpo"
    assert not second["valid"] and second["reason"].startswith(
        "LLM request failed after 3 attempts: malformed response: the body is not JSON"
    )


def test_huge_and_deeply_nested_replies_are_failed_proposals(
    server: ScriptedOpenAIServer, tmp_path: Path
) -> None:
    server.push_text("{" + '"a": ' * 10 + "1" + "}" * 10)  # no code, but parsed
    server.push_text('{"code": ' + "[" * 5_000 + "]" * 5_000 + "}")
    server.push_text('{"thought": "' + "x" * 1_000_000 + '"}')  # 1 MB of content
    proposer = make_proposer(server, max_retries=0)
    results = proposer.propose(Archive(tmp_path / "a.jsonl"), 3)
    assert all(isinstance(r, ProposalError) for r in results)
    messages = [r.message for r in results]  # type: ignore[union-attr]
    assert "nested deeper than 20 levels" in messages[1]
    assert "reply larger than" in messages[2] or "characters (at most" in messages[2]
    assert len(server.requests) == 3


def test_error_bodies_of_other_shapes_keep_their_message(
    server: ScriptedOpenAIServer, tmp_path: Path
) -> None:
    server.push(Reply.raw(b'{"detail": "Invalid API key"}', status=401))
    error = propose_one(make_proposer(server), tmp_path)
    assert isinstance(error, ProposalError)
    assert error.message == "HTTP 401: Invalid API key, not retried"
    body = {"error": {"message": "json_schema is not supported", "type": "invalid_request_error"}}
    server.push(Reply.raw(json.dumps(body).encode(), status=500))
    error = propose_one(make_proposer(server), tmp_path)
    assert isinstance(error, ProposalError) and len(server.requests) == 2  # not retried
    assert "HTTP 500: json_schema is not supported" in error.message


def test_the_prompt_is_summarized_to_fit_its_budget(
    server: ScriptedOpenAIServer, tmp_path: Path
) -> None:
    archive = run_discovery(
        make_proposer(server), synthetic_fitness, generations=0, candidates_per_generation=1,
        archive_path=tmp_path / "a.jsonl", baselines={
            f"base_{i}": SIG.format(name=f"base_{i}") + f"    return -F.logsigmoid({i + 1} * rho)\n"
            for i in range(8)
        }, workdir=tmp_path / "sb", log=lambda _: None,
    )  # fmt: skip
    full = build_messages(archive)
    full_chars = sum(len(m["content"]) for m in full)
    notes: list[str] = []
    budget = full_chars - 400
    server.push_json(GOOD)
    proposer = make_proposer(server, max_prompt_chars=budget, log=notes.append)
    proposer.propose(archive, 1)
    sent = sum(len(m["content"]) for m in server.requests[0].body["messages"])
    assert sent <= budget < full_chars
    assert notes and "summarized to fit max_prompt_chars" in notes[0]
    with pytest.raises(ValueError, match="max_prompt_chars=500 cannot hold"):
        make_proposer(server, max_prompt_chars=500)
