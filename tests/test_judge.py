"""The LLM-judge win rate against a real HTTP judge on 127.0.0.1 with scripted verdicts.

`JudgeServer` extends the shared ScriptedOpenAIServer: replies queued with push_* come first
(errors, delays), then a `decide(first, second) -> reply` function answers from the two
responses it was shown, so verdicts do not depend on the order in which threads arrive.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable

import pytest
from openai_server import RecordedRequest, Reply, ScriptedOpenAIServer

from prefalign.evaluation.judge import (
    JudgeConfig,
    JudgeError,
    build_messages,
    judge_pairwise,
    parse_verdict,
)

Decide = Callable[[str, str], str]


def shown_answers(request: RecordedRequest) -> tuple[str, str]:
    text = request.body["messages"][1]["content"]  # the prompt (retries append a reminder)
    first = re.search(r"\[Response A\]\n(.*)\n\[End of response A\]", text, re.S)
    second = re.search(r"\[Response B\]\n(.*)\n\[End of response B\]", text, re.S)
    assert first and second, text
    return first.group(1), second.group(1)


class JudgeServer(ScriptedOpenAIServer):
    def __init__(self, decide: Decide, latency_s: float = 0.0) -> None:
        super().__init__()
        self.decide = decide
        self.latency_s = latency_s
        self.in_flight = 0
        self.max_in_flight = 0
        self._flight_lock = threading.Lock()

    def _next(self, request: RecordedRequest) -> Reply:
        with self._flight_lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            time.sleep(self.latency_s)
            with self._lock:
                self.requests.append(request)
                if self.replies:
                    return self.replies.popleft()
            return Reply.text(self.decide(*shown_answers(request)))
        finally:
            with self._flight_lock:
                self.in_flight -= 1


def always(token: str) -> Decide:
    return lambda first, second: f"Both are fine.\n{token}"


def prefers_longer(first: str, second: str) -> str:
    if len(first) == len(second):
        return "[[TIE]]"
    return "The longer one is more detailed. [[A]]" if len(first) > len(second) else "[[B]]"


def prefers_good(first: str, second: str) -> str:
    a, b = "good" in first, "good" in second
    return "[[A]]" if a and not b else "[[B]]" if b and not a else "[[TIE]]"


def config(server: ScriptedOpenAIServer, tmp_path, **kw) -> JudgeConfig:
    defaults = dict(
        base_url=server.base_url,
        model="judge-1",
        api_key_env=None,
        cache_dir=tmp_path / "cache",
        concurrency=2,
        max_retries=2,
        timeout_s=5.0,
        backoff_s=0.01,
        n_bootstrap=200,
    )
    return JudgeConfig(**{**defaults, **kw})


PROMPTS = [f"prompt {i}" for i in range(6)]
POLICY = [f"policy answer {i}" for i in range(6)]
REFERENCE = [f"reference answer {i}" for i in range(6)]


def test_both_orders_cancel_a_judge_that_always_answers_a(tmp_path):
    with JudgeServer(always("[[A]]")) as server:
        result = judge_pairwise(PROMPTS, POLICY, REFERENCE, config(server, tmp_path))
        shown = {shown_answers(r) for r in server.requests}
    assert len(server.requests) == 12
    pairs = list(zip(POLICY, REFERENCE, strict=True))
    assert shown == set(pairs) | {(r, p) for p, r in pairs}
    assert result.win_rate == 0.5 and result.lc_win_rate == pytest.approx(0.5, abs=1e-6)
    assert (result.wins, result.losses, result.ties, result.n) == (0, 0, 6, 6)
    assert result.position_consistency == 0.0
    for prompt in result.per_prompt:
        prefs = {j.order: j.preference for j in prompt.judgments}
        assert prefs == {"policy_first": 1.0, "reference_first": 0.0}


def test_a_real_preference_is_measured_in_both_orders(tmp_path):
    policy = [f"a good answer {i}" for i in range(6)]
    with JudgeServer(prefers_good) as server:
        result = judge_pairwise(PROMPTS, policy, REFERENCE, config(server, tmp_path))
    assert result.win_rate == 1.0 and result.wins == 6 and result.position_consistency == 1.0
    assert result.lc_win_rate > 0.95 and result.win_rate_ci == (1.0, 1.0)
    # Swap the roles: the reference now wins every prompt.
    with JudgeServer(prefers_good) as server:
        result = judge_pairwise(PROMPTS, REFERENCE, policy, config(server, tmp_path))
    assert result.win_rate == 0.0 and result.losses == 6


def test_ties(tmp_path):
    with JudgeServer(always("[[TIE]]")) as server:
        result = judge_pairwise(PROMPTS, POLICY, REFERENCE, config(server, tmp_path))
    assert result.win_rate == 0.5 and result.ties == 6 and result.position_consistency == 1.0
    assert all(
        j.verdict == "TIE" and j.flag is None for p in result.per_prompt for j in p.judgments
    )
    # Half ties, half wins: a score of 0.75 per prompt.
    policy = [f"good {i}" for i in range(6)]

    def tie_when_policy_first(first: str, second: str) -> str:
        return "[[TIE]]" if first.startswith("good") else prefers_good(first, second)

    with JudgeServer(tie_when_policy_first) as server:
        result = judge_pairwise(PROMPTS, policy, REFERENCE, config(server, tmp_path))
    assert result.win_rate == 0.75 and result.wins == 6


def test_length_control_discounts_a_judge_that_prefers_longer_answers(tmp_path):
    n = 40
    prompts = [f"q{i}" for i in range(n)]
    reference = ["r" * 30 for _ in range(n)]
    # The policy is longer on 3 of 4 prompts, shorter on the rest.
    policy = ["p" * (30 + 5 + 2 * i) if i % 4 else "p" * (30 - 5 - i // 2) for i in range(n)]
    with JudgeServer(prefers_longer) as server:
        biased = judge_pairwise(prompts, policy, reference, config(server, tmp_path, concurrency=4))
    assert biased.win_rate == 0.75 and biased.length_slope > 1.0
    assert abs(biased.lc_win_rate - 0.5) < 0.1
    assert biased.lc_ci[0] < 0.5 < biased.lc_ci[1]
    assert biased.win_rate_ci[0] > 0.55
    # A judge blind to length, with quality independent of length (the policy is better in 7
    # of 10 blocks of 4 prompts, each block 3 longer and 1 shorter): the correction is small.
    better = [(i // 4) % 4 != 0 for i in range(n)]
    policy_good = [("good " if b else "okay ") + p for b, p in zip(better, policy, strict=True)]
    reference_good = [
        ("okay " if b else "good ") + r for b, r in zip(better, reference, strict=True)
    ]
    with JudgeServer(prefers_good) as server:
        fair = judge_pairwise(prompts, policy_good, reference_good, config(server, tmp_path))
    assert fair.win_rate == 0.7 and abs(fair.lc_win_rate - fair.win_rate) < 0.05


def test_a_rerun_is_served_from_the_cache(tmp_path):
    with JudgeServer(prefers_good) as server:
        first = judge_pairwise(PROMPTS, POLICY, REFERENCE, config(server, tmp_path))
        assert len(server.requests) == 12 and first.cache_hits == 0 and first.requests == 12
    with JudgeServer(prefers_good) as server:
        again = judge_pairwise(PROMPTS, POLICY, REFERENCE, config(server, tmp_path))
        assert server.requests == [] and again.cache_hits == 12 and again.requests == 0
        assert again.summary() | {"cache_hits": 0, "requests": 0} == first.summary() | {
            "cache_hits": 0,
            "requests": 0,
        }
        # One changed answer: only its two orders are asked.
        changed = [*POLICY[:-1], "a new answer"]
        judge_pairwise(PROMPTS, changed, REFERENCE, config(server, tmp_path))
        assert len(server.requests) == 2
        # Another judge model does not share verdicts.
        judge_pairwise(PROMPTS, POLICY, REFERENCE, config(server, tmp_path, model="judge-2"))
        assert len(server.requests) == 14
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 26


def test_transient_errors_are_retried(tmp_path):
    with JudgeServer(prefers_good) as server:
        server.push_status(429, {"retry-after": "0"})
        server.push_status(500)
        server.push_delay(5.0, then=Reply.text("[[A]]"))  # answers after the client's timeout
        cfg = config(server, tmp_path, concurrency=1, max_retries=3, timeout_s=1.5)
        result = judge_pairwise(PROMPTS[:2], POLICY[:2], REFERENCE[:2], cfg)
    assert len(server.requests) == 4 + 3 and result.requests == 7
    assert result.win_rate == 0.5 and result.n == 2 and result.failed == 0


def test_exhausted_retries_raise_then_a_rerun_repeats_only_the_failure(tmp_path):
    with JudgeServer(prefers_good) as server:
        for _ in range(3):
            server.push_status(503)
        cfg = config(server, tmp_path, concurrency=1, max_retries=2, on_error="raise")
        with pytest.raises(
            JudgeError, match=r"1 of 2 judgments failed.*after 3 attempts: HTTP 503"
        ):
            judge_pairwise(PROMPTS[:1], POLICY[:1], REFERENCE[:1], cfg)
        assert len(server.requests) == 4
        result = judge_pairwise(PROMPTS[:1], POLICY[:1], REFERENCE[:1], cfg)
        assert len(server.requests) == 5 and result.cache_hits == 1


def test_exhausted_retries_can_be_counted_instead(tmp_path):
    with JudgeServer(prefers_good) as server:
        for _ in range(2):
            server.push_status(502)
        cfg = config(server, tmp_path, concurrency=1, max_retries=1, on_error="skip")
        result = judge_pairwise(PROMPTS[:2], ["good"] * 2, REFERENCE[:2], cfg)
    assert result.failed == 1 and result.n == 2 and result.win_rate == 1.0
    assert [len(p.judgments) for p in result.per_prompt] == [1, 2]


def test_client_errors_are_not_retried(tmp_path):
    with JudgeServer(prefers_good) as server:
        server.push_status(401)
        cfg = config(server, tmp_path, concurrency=1, on_error="raise")
        with pytest.raises(JudgeError, match="HTTP 401.*not retried"):
            judge_pairwise(PROMPTS[:1], POLICY[:1], REFERENCE[:1], cfg)
        assert len(server.requests) == 2  # the other order went through


def test_a_failed_judgment_is_recorded_the_evaluation_finishes_and_nothing_bad_is_cached(tmp_path):
    with JudgeServer(prefers_good) as server:
        for _ in range(3):
            server.push_status(503)
        cfg = config(server, tmp_path, concurrency=1, max_retries=2)  # on_error: skip, the default
        result = judge_pairwise(PROMPTS[:2], ["good"] * 2, REFERENCE[:2], cfg)
        assert len(server.requests) == 3 + 3
        assert result.failed == 1 and result.n == 2 and result.win_rate == 1.0
        assert result.summary()["failed"] == 1
        (lost,) = [e for p in result.per_prompt for e in p.errors]
        assert "after 3 attempts: HTTP 503" in lost
        assert len(list((tmp_path / "cache").rglob("*.json"))) == 3  # the failure is not cached
        again = judge_pairwise(PROMPTS[:2], ["good"] * 2, REFERENCE[:2], cfg)
        assert len(server.requests) == 7 and again.failed == 0 and again.cache_hits == 3


def test_unparsed_verdicts_are_counted_not_ties_not_cached_and_retried_at_other_temperatures(
    tmp_path,
):
    with JudgeServer(always("I cannot decide.")) as server:
        result = judge_pairwise(
            PROMPTS[:2], POLICY[:2], REFERENCE[:2], config(server, tmp_path, max_retries=2)
        )
        assert len(server.requests) == 4 * 3
        temperatures = sorted(r.body["temperature"] for r in server.requests)
        assert temperatures == [0.0] * 4 + [0.7] * 4 + [1.0] * 4
        retried = [r for r in server.requests if r.body["temperature"] > 0]
        assert all("could not be used" in r.body["messages"][-1]["content"] for r in retried)
    assert result.unparsed == 4 and result.n == 0 and result.ties == 0
    summary = result.summary()
    assert summary["unparsed"] == 4 and summary["win_rate"] is None  # not a silent 0.5
    assert not list((tmp_path / "cache").rglob("*.json"))
    with JudgeServer(prefers_good) as server:
        server.push_text("hmm")
        result = judge_pairwise(
            PROMPTS[:1], ["good"], REFERENCE[:1], config(server, tmp_path, concurrency=1)
        )
    assert result.unparsed == 0 and result.win_rate == 1.0 and result.requests == 3


def test_garbled_and_oversized_bodies_are_failed_attempts(tmp_path):
    with JudgeServer(prefers_good) as server:
        server.push(Reply.raw(b"<html>502 Bad Gateway</html>"), Reply.raw(b'{"choices": [{"mess'))
        server.push(Reply.text("x" * (2 << 20)))  # 2 MiB of content
        cfg = config(server, tmp_path, concurrency=1, max_retries=3)
        result = judge_pairwise(PROMPTS[:1], ["good"], REFERENCE[:1], cfg)
        assert result.failed == 0 and result.win_rate == 1.0 and len(server.requests) == 5
        for _ in range(2):
            server.push(Reply.raw(b"not json at all"))
        cfg = config(server, tmp_path, concurrency=1, max_retries=1)
        result = judge_pairwise(PROMPTS[1:2], ["good"], REFERENCE[1:2], cfg)
    assert result.failed == 1
    (lost,) = [e for p in result.per_prompt for e in p.errors]
    assert "after 2 attempts: malformed response: the body is not JSON" in lost


def test_error_bodies_of_any_shape_keep_their_message_and_invalid_5xx_is_not_retried(tmp_path):
    with JudgeServer(prefers_good) as server:
        server.push(Reply.raw(b'{"detail": "Invalid API key"}', status=401))
        invalid = {
            "error": {
                "message": "response_format json_schema is not supported",
                "type": "invalid_request_error",
            }
        }
        server.push(Reply.raw(json.dumps(invalid).encode(), status=500))
        cfg = config(server, tmp_path, concurrency=1, max_retries=3)
        result = judge_pairwise(PROMPTS[:1], POLICY[:1], REFERENCE[:1], cfg)
        assert len(server.requests) == 2  # neither retried
    errors = result.per_prompt[0].errors
    assert result.failed == 2 and result.n == 0
    assert any("HTTP 401: Invalid API key, not retried" in e for e in errors)
    assert any("HTTP 500: response_format json_schema is not supported" in e for e in errors)


def test_no_key_form_max_tokens_and_json_mode(tmp_path):
    with JudgeServer(lambda a, b: json.dumps({"reasoning": "A is good", "verdict": "A"})) as server:
        cfg = config(server, tmp_path, api_key_env="NONE", max_tokens=77, json_mode=True)
        result = judge_pairwise(PROMPTS[:1], POLICY[:1], REFERENCE[:1], cfg)
        (request, _) = server.requests
    assert result.n == 1 and result.unparsed == 0 and result.win_rate == 0.5
    assert "authorization" not in {k.lower() for k in request.headers}
    assert request.body["max_tokens"] == 77
    assert request.body["response_format"] == {"type": "json_object"}
    assert '"verdict"' in request.body["messages"][0]["content"]


@pytest.mark.parametrize("limit", [1, 3])
def test_concurrency_limit(tmp_path, limit):
    with JudgeServer(prefers_good, latency_s=0.1) as server:
        judge_pairwise(PROMPTS, POLICY, REFERENCE, config(server, tmp_path, concurrency=limit))
    assert server.max_in_flight == limit


@pytest.mark.parametrize(
    "reply, verdict",
    [
        ("[[A]]", "A"),
        ("reasoning... [[B]]", "B"),
        ("[[tie]]", "TIE"),
        ("[[C]]", "TIE"),
        ("[[A>>B]]", "A"),
        ("[[B>A]]", "B"),
        ("[[A=B]]", "TIE"),
        ("B", "B"),
        ("[[A]] at first, but on reflection [[B]]", "B"),
        ("no verdict", None),
        ("", None),
    ],
)
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply) == verdict


def test_bad_inputs(tmp_path, monkeypatch):
    monkeypatch.delenv("JUDGE_KEY", raising=False)
    cfg = JudgeConfig(
        base_url="http://127.0.0.1:9/v1", model="m", api_key_env="JUDGE_KEY", cache_dir=tmp_path
    )
    with pytest.raises(ValueError, match="JUDGE_KEY"):
        judge_pairwise(["p"], ["a"], ["b"], cfg)
    with pytest.raises(ValueError, match="match one to one"):
        judge_pairwise(["p", "q"], ["a"], ["b"], cfg)
    with pytest.raises(ValueError, match="concurrency"):
        JudgeConfig(base_url="x", model="m", concurrency=0)
    assert "[Response B]\nsecond\n" in build_messages("p", "first", "second")[1]["content"]


def test_compare_models_on_the_same_prompts(tmp_path, tiny_llama_dir, tiny_tokenizer):
    import torch
    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    from prefalign.evaluation.compare import compare_models, comparison_table

    torch.manual_seed(1)
    other = tmp_path / "other"
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    prompts = ["the movie was", "i think it", "what a"]
    with JudgeServer(prefers_longer) as server:
        rows = compare_models(
            {"sft": tiny_llama_dir, "other": other},
            "sentiment",
            prompts,
            reference=tiny_llama_dir,
            judge=config(server, tmp_path),
            max_new_tokens=6,
            device="cpu",
        )
        # At most both orders per model and prompt; a pair shown twice (equal answers) is asked
        # once.
        asked = [r.prompt for r in server.requests]
        assert len(set(asked)) == len(asked) <= 2 * 2 * len(prompts)
    assert [r["model"] for r in rows] == ["sft", "other"]
    # The reference against itself, same seed: same answers, so no drift and even odds.
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4) and rows[0]["win_rate"] == 0.5
    assert rows[1]["kl"] != pytest.approx(0.0, abs=1e-3) and 0.0 <= rows[1]["win_rate"] <= 1.0
    table = comparison_table(rows)
    assert table.splitlines()[0].startswith("| model | gold_reward |") and "win_rate_ci" in table
    assert len(table.splitlines()) == 4


def test_cli_judge_options_the_no_key_form_and_a_failed_judgment(
    tmp_path, tiny_llama_dir, capsys, monkeypatch
):
    from prefalign.cli import main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # the verdict cache

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": p}) + "\n" for p in ["the movie was", "i think"])
    )
    out = tmp_path / "rows.json"
    with JudgeServer(prefers_longer) as server:
        server.push_status(503)  # the first judgment fails: --judge-retries 0
        code = main([
            "eval", "--task", "sentiment", "--model", str(tiny_llama_dir),
            "--reference", str(tiny_llama_dir), "--prompts", str(prompts),
            "--compare", f"same={tiny_llama_dir}", "--max-new-tokens", "4",
            "--judge-url", server.base_url, "--judge-model", "j", "--judge-api-key-env", "NONE",
            "--judge-retries", "0", "--judge-timeout", "5", "--judge-on-error", "skip",
            "--judge-concurrency", "1", "--judge-max-tokens", "33", "--out", str(out),
        ])  # fmt: skip
        assert all(r.body["max_tokens"] == 33 for r in server.requests)
        assert all("authorization" not in {k.lower() for k in r.headers} for r in server.requests)
    assert code == 0
    rows = json.loads(out.read_text())
    # Equal answers: a prompt's two orders are one request, so its failure counts twice; the
    # second model asks again (failures are not cached) and gets its verdict.
    assert [r["judge_failed"] for r in rows] == [2, 0]
    assert all(r["judge_unparsed"] == 0 for r in rows)
    assert "judge_failed" in capsys.readouterr().out


def test_cli_eval_with_a_judge_and_no_compare_judges_against_the_reference(
    tmp_path, tiny_llama_dir, tiny_tokenizer, capsys, monkeypatch
):
    """`--judge-url` without `--compare` used to be ignored: no request, no win rate."""
    import torch
    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    from prefalign.cli import main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    torch.manual_seed(1)
    other = tmp_path / "other"
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    prompts = tmp_path / "prompts.jsonl"
    texts = ["the movie was", "i think", "what a"]
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in texts))
    out = tmp_path / "result.json"
    with JudgeServer(prefers_longer) as server:
        code = main([
            "eval", "--task", "sentiment", "--model", str(other),
            "--reference", str(tiny_llama_dir), "--prompts", str(prompts), "--max-new-tokens", "6",
            "--judge-url", server.base_url, "--judge-model", "j", "--judge-api-key-env", "NONE",
            "--out", str(out),
        ])  # fmt: skip
        shown = {p for r in server.requests for p in texts if p in r.prompt}
    assert code == 0
    assert shown == set(texts)  # every prompt judged: the model against the reference's answer
    printed = json.loads(capsys.readouterr().out)
    assert 0.0 <= printed["win_rate"] <= 1.0 and printed["judge_failed"] == 0
    saved = json.loads(out.read_text())
    assert saved["win_rate"] == printed["win_rate"] and len(saved["samples"]) == len(texts)


def test_cli_judge_options_without_a_judge_url_are_refused(tmp_path, tiny_llama_dir, capsys):
    from prefalign.cli import main

    code = main([
        "eval", "--task", "sentiment", "--model", str(tiny_llama_dir),
        "--reference", str(tiny_llama_dir), "--judge-model", "gpt-4o", "--judge-json-mode",
    ])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("--judge-model, --judge-json-mode need --judge-url (the judge's endpoint)")
    assert "\n" not in err
