"""The LLM proposer: any OpenAI-compatible chat-completions endpoint writes objective code.

Each proposal is one chat request; the prompt carries the task, the signature and rules,
and the archive (best objectives with code, recent ones with their fitness or the reason
they failed). Transient failures (429, 5xx, timeouts, connection errors) are retried with
exponential backoff, a bounded number of times; every other failure, and any reply that is
not the JSON asked for, becomes a ProposalError that the archive records and the next prompt
shows.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from typing import Any

from prefalign.discovery.archive import Archive
from prefalign.discovery.candidate import Candidate, ProposalError
from prefalign.discovery.static_check import FUNCTIONAL, MATH, TORCH_FUNCTIONS

RETRY_STATUS = frozenset({408, 409, 429}) | frozenset(range(500, 600))
MAX_CODE_IN_PROMPT = 1500
SIGNATURE = (
    "def <name>(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, "
    "reference_rejected_logps, beta=0.05):"
)

SYSTEM_PROMPT = f"""You are a machine-learning researcher who designs offline preference \
optimization objectives for aligning language models, like DPO, IPO, SLiC (hinge) or DiscoPOP.

An objective is one Python function with this signature:
    {SIGNATURE}
Its inputs are 1-D float tensors of shape [B]: the summed log-probabilities of the chosen and \
rejected responses under the policy being trained and under the frozen reference policy. It \
returns the per-pair loss, a tensor of shape [B] (do NOT reduce with mean or sum). With \
rho = (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - \
reference_rejected_logps), DPO is -F.logsigmoid(beta * rho).

Rules (code breaking them is rejected before it runs):
- no imports; the names torch, F (torch.nn.functional) and math are already available;
- only arithmetic, comparisons, if/else, `for i in range(...)`, assignments to plain names and \
these functions: torch.{{{", ".join(sorted(TORCH_FUNCTIONS))}}}; F.{{{", ".join(sorted(FUNCTIONAL))}}}; \
math.{{{", ".join(sorted(MATH))}}}; and tensor methods such as .exp(), .clamp(), .mean();
- no underscores-prefixed attributes, no while loops, lambdas, classes, I/O or in-place ops;
- extra parameters (hyper-parameters such as beta) need default values;
- the loss must be finite with finite gradients for margins up to +-1000, must depend on the \
policy log-probs, and must decrease when the chosen response gains probability over the \
rejected one.

Reply with ONE JSON object and nothing else:
{{"thought": "<why this objective could work better>", "name": "<short_snake_case_name>", \
"code": "<the Python function>"}}"""


class LLMProposer:
    """Proposals from an OpenAI-compatible chat endpoint (OpenAI, vLLM, Ollama, ...).

    The API key is read from the environment variable `api_key_env` (None: the endpoint
    needs no key). `max_retries` bounds the retries of one request after its first attempt.
    """

    origin = "llm"

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        max_retries: int = 3,
        timeout_s: float = 30.0,
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        temperature: float | None = 0.8,
        max_tokens: int | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        import openai  # optional dependency: pip install prefalign[llm]

        api_key = "unused" if api_key_env is None else os.environ.get(api_key_env)
        if not api_key:
            raise ValueError(
                f"LLM proposer: set the environment variable {api_key_env} to the API key "
                "(or api_key_env: null for an endpoint without keys)"
            )
        if max_retries < 0:
            raise ValueError(f"LLM proposer: max_retries must be >= 0, got {max_retries}")
        self._openai = openai
        # The client's own retries are off: ours are bounded, counted and logged.
        self.client = openai.OpenAI(
            base_url=base_url, api_key=api_key, max_retries=0, timeout=timeout_s
        )
        self.model = model
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.sleep = sleep
        self.attempts = 0  # requests sent, over the proposer's life

    def propose(self, archive: Archive, n: int) -> list[Candidate | ProposalError]:
        out: list[Candidate | ProposalError] = []
        for _ in range(n):
            pending = [c for c in out if isinstance(c, Candidate)]
            out.append(self.propose_one(build_messages(archive, pending)))
        return out

    def propose_one(self, messages: list[dict[str, str]]) -> Candidate | ProposalError:
        content, attempts, error = self._complete(messages)
        if content is None:
            return ProposalError(error or "no reply", attempts=attempts, origin=self.origin)
        try:
            return parse_reply(content, origin=self.origin)
        except ValueError as e:
            return ProposalError(f"malformed reply: {e}", raw=content[:2000], attempts=attempts)

    def _complete(self, messages: list[dict[str, str]]) -> tuple[str | None, int, str | None]:
        """(reply text or None, attempts made, last error)."""
        oai = self._openai
        # Omitted when None: some endpoints (reasoning models) refuse these parameters.
        kwargs: dict[str, Any] = {}
        if self.temperature is not None:
            kwargs["temperature"] = self.temperature
        if self.max_tokens is not None:
            kwargs["max_tokens"] = self.max_tokens
        error = None
        for attempt in range(1, self.max_retries + 2):
            self.attempts += 1
            retry_after = None
            try:
                response = self.client.chat.completions.create(
                    model=self.model,
                    messages=messages,
                    **kwargs,  # type: ignore[arg-type]
                )
                choices = response.choices or []
                content = choices[0].message.content if choices else None
                if content is None:
                    return None, attempt, "malformed reply: the response has no message content"
                return content, attempt, None
            except oai.APITimeoutError:
                error = "request timed out"
            except oai.APIConnectionError as e:
                error = f"connection error: {e}"
            except oai.APIStatusError as e:
                error = f"HTTP {e.status_code}: {_short(e.message)}"
                if e.status_code not in RETRY_STATUS:
                    return None, attempt, f"LLM request failed ({error}), not retried"
                retry_after = _retry_after(e.response.headers.get("retry-after"))
            except oai.APIResponseValidationError as e:
                return None, attempt, f"malformed reply: {_short(str(e))}"
            if attempt <= self.max_retries:
                delay = min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s)
                self.sleep(min(max(delay, retry_after or 0.0), self.max_backoff_s))
        return (
            None,
            self.max_retries + 1,
            (f"LLM request failed after {self.max_retries + 1} attempts: {error}"),
        )


def build_messages(
    archive: Archive, pending: list[Candidate] | None = None
) -> list[dict[str, str]]:
    """System prompt (task, signature, rules) and user prompt (the archive so far)."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": archive_prompt(archive, pending or [])},
    ]


def archive_prompt(
    archive: Archive, pending: list[Candidate], top: int = 5, recent: int = 12
) -> str:
    """The archive as the proposer should see it: best code first, then recent outcomes."""
    parts = []
    board = archive.leaderboard(top)
    if board:
        parts.append("Best objectives so far (higher fitness is better):")
        by_hash = {r["code_hash"]: r for r in archive.scored()}
        for row in board:
            code = by_hash[row["code_hash"]]["code"]
            parts.append(
                f"\n# {row['rank']}. {row['name']} ({row['origin']}): fitness {row['fitness']:.4g}"
                f"{_metrics_text(row.get('metrics'))}\n{_clip(code)}"
            )
    latest = archive.records[-recent:]
    if latest:
        parts.append("\nMost recent proposals and their outcome:")
        for r in latest:
            parts.append(
                f"- {r.get('name') or '(no candidate)'} [{r.get('origin')}]: {_outcome(r)}"
            )
    if pending:
        parts.append("\nAlready proposed in this round (not evaluated yet): "
                     + ", ".join(c.name for c in pending))  # fmt: skip
    if not parts:
        parts.append("No objectives have been evaluated yet.")
    parts.append(
        "\nPropose ONE new objective that differs from all of the above and could reach a "
        "higher fitness. Learn from the failures. Reply with the JSON object only."
    )
    return "\n".join(parts)


def parse_reply(content: str, origin: str = "llm") -> Candidate:
    """A Candidate from the reply text; ValueError saying what is wrong otherwise."""
    data = _json_object(content)
    code = data.get("code")
    if not isinstance(code, str) or not code.strip():
        raise ValueError("the JSON object has no 'code' string")
    name = data.get("name")
    name = name if isinstance(name, str) and name.strip() else "candidate"
    name = re.sub(r"\W+", "_", name.strip()).strip("_")[:64] or "candidate"
    thought = data.get("thought")
    return Candidate(
        name=name,
        code=_strip_fence(code),
        thought=thought if isinstance(thought, str) else "",
        origin=origin,
    )


def _json_object(content: str) -> dict[str, Any]:
    """The reply's JSON object: the whole text, a ```json fenced block, or the outermost {...}."""
    texts = [content.strip()]
    fenced = re.search(r"```(?:json)?\s*(\{.*\})\s*```", content, re.DOTALL)
    if fenced:
        texts.append(fenced.group(1))
    start, end = content.find("{"), content.rfind("}")
    if 0 <= start < end:
        texts.append(content[start : end + 1])
    last_error = "no JSON object found"
    for text in texts:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            last_error = f"invalid JSON ({e.msg} at line {e.lineno} column {e.colno})"
            continue
        if isinstance(data, dict):
            return data
        last_error = f"expected a JSON object, got {type(data).__name__}"
    raise ValueError(last_error)


def _strip_fence(code: str) -> str:
    match = re.fullmatch(r"\s*```(?:python)?\s*\n(.*?)\n?```\s*", code, re.DOTALL)
    return match.group(1) if match else code


def _outcome(record: dict[str, Any]) -> str:
    if record.get("valid") and record.get("same_behaviour_as"):
        return (f"fitness {record['fitness']:.4g}: computes exactly the same loss as "
                f"{record['same_behaviour_as']!r}; propose something that behaves differently")
    if record.get("valid") and record.get("fitness") is not None:
        return f"fitness {record['fitness']:.4g}{_metrics_text(record.get('metrics'))}"
    return f"FAILED: {record.get('reason')}"


def _metrics_text(metrics: dict[str, Any] | None) -> str:
    shown = [f"{k} {v:.4g}" for k, v in (metrics or {}).items() if isinstance(v, (int, float))]
    return f" ({', '.join(shown[:4])})" if shown else ""


def _clip(code: str) -> str:
    return code if len(code) <= MAX_CODE_IN_PROMPT else code[:MAX_CODE_IN_PROMPT] + "\n# ...(cut)"


def _short(text: str, limit: int = 200) -> str:
    text = re.sub(r"^Error code: \d+ - ", "", " ".join(str(text).split()))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
