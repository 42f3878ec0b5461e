"""The LLM proposer and the judge against a real server no one here wrote: llama.cpp's
OpenAI-compatible server (llama-cpp-python) with SmolLM2-135M-Instruct, started on 127.0.0.1.

What is checked is the protocol, not the model's quality: requests succeed, every outcome is
recorded with its reason, verdicts are cached and reused, and reruns make no request (the
server is stopped before the reruns, so any request would fail and show).
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
pytest.importorskip(
    "llama_cpp", reason="needs llama-cpp-python[server] (scripts/provision-tests.sh)"
)
pytest.importorskip("uvicorn", reason="needs llama-cpp-python[server] (scripts/provision-tests.sh)")

from prefalign import llm_server  # noqa: E402
from prefalign.discovery import Archive  # noqa: E402
from prefalign.discovery.recipe import (  # noqa: E402
    DiscoverConfig,
    ProposerSpec,
    ProxySpec,
    run_discover,
)
from prefalign.evaluation.judge import JudgeConfig, judge_pairwise  # noqa: E402
from prefalign.llm_client import ChatClient  # noqa: E402

PROMPTS = ["Name a fruit.", "What is 2 + 2?", "Say hello.", "Name a colour."]
GOOD = ["An apple.", "2 + 2 is 4.", "Hello!", "Blue."]
BAD = ["I like trains.", "Seventeen, probably.", "No.", "The number nine."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    port = free_port()
    log = tmp_path_factory.mktemp("llama") / "server.log"
    proc = llm_server.start(port=port, log_path=log, alias="smollm2")
    yield {"proc": proc, "port": port, "url": f"http://127.0.0.1:{port}/v1", "log": log}
    llm_server.stop(proc)


def test_invalid_request_5xx_is_not_retried(server: dict) -> None:
    # llama.cpp answers a response_format it does not know with HTTP 500 and a validation
    # error; retrying the same request cannot help.
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    client = ChatClient(server["url"], "smollm2", max_retries=3, backoff_s=0.01, timeout_s=60,
                        max_tokens=8, extra_body={"response_format": schema})  # fmt: skip
    reply = client.complete([{"role": "user", "content": "hi"}])
    assert not reply.ok and reply.attempts == 1 and client.requests == 1
    assert "HTTP 500" in (reply.error or "") and "not retried" in (reply.error or "")


def test_discovery_and_a_judged_comparison_against_llama_cpp(server: dict, tmp_path: Path) -> None:
    lines: list[str] = []
    config = DiscoverConfig(
        out_dir=str(tmp_path / "discover"), generations=1, candidates_per_generation=3,
        proposer=ProposerSpec(
            kind="llm", base_url=server["url"], model="smollm2", api_key_env="NONE",
            max_retries=1, timeout_s=120, backoff_s=0.1, max_tokens=384, json_mode=True,
            max_prompt_chars=9000,
        ),
        proxy=ProxySpec(task="synthetic"),
    )  # fmt: skip
    archive = run_discover(config, log=lines.append)
    proposals = [r for r in archive.load() if r["generation"] == 0]
    assert len(proposals) == 3
    for record in proposals:  # each request went through; each outcome has its reason
        assert record["valid"] or record["reason"], record
        assert not (record["reason"] or "").startswith("LLM request failed"), record["reason"]
    judge = JudgeConfig(
        base_url=server["url"], model="smollm2", api_key_env="NONE", concurrency=1,
        max_retries=1, timeout_s=120, backoff_s=0.1, max_tokens=96,
        cache_dir=tmp_path / "verdicts", n_bootstrap=50,
    )  # fmt: skip
    first = judge_pairwise(PROMPTS, GOOD, BAD, judge)
    assert first.failed == 0 and first.requests >= 2 * len(PROMPTS)
    parsed = sum(len(p.judgments) for p in first.per_prompt)
    assert parsed + first.unparsed == 2 * len(PROMPTS)
    assert all(e.startswith(("policy_first: unparsed", "reference_first: unparsed"))
               for p in first.per_prompt for e in p.errors)  # fmt: skip
    summary = {"proposals": [(r["valid"], r["reason"]) for r in proposals],
               "parsed_verdicts": parsed, "unparsed": first.unparsed,
               "win_rate": first.summary()["win_rate"]}  # fmt: skip
    (tmp_path / "measured.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))

    # Reruns against a stopped server: discovery resumes with nothing left to propose, and the
    # judge answers every parsed verdict from its cache (only unparsed ones would be asked).
    llm_server.stop(server["proc"])
    before = len(Archive(Path(config.out_dir) / "archive.jsonl"))
    run_discover(config, resume=True, log=lines.append)
    assert len(Archive(Path(config.out_dir) / "archive.jsonl")) == before
    if first.unparsed == 0:
        again = judge_pairwise(PROMPTS, GOOD, BAD, judge)
        assert again.requests == 0 and again.cache_hits == parsed
    else:
        cached = JudgeConfig(**{**judge.__dict__, "max_retries": 0, "timeout_s": 2})
        again = judge_pairwise(PROMPTS, GOOD, BAD, cached)
        assert again.cache_hits == parsed and again.requests == first.unparsed
        assert again.failed == first.unparsed  # the server is gone: recorded, not raised
