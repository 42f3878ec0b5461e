"""The LLM proposer: any OpenAI-compatible chat-completions endpoint writes objective code.

Each proposal is one chat request (prefalign.llm_client: bounded retries of transient
failures, bounded reply size); the prompt carries the task, the signature and rules, and the
archive (best objectives with code, recent ones with their fitness or the reason they
failed), summarized to fit `max_prompt_chars`. Every failure, and any reply that is not the
JSON asked for, becomes a ProposalError that the archive records and the next prompt shows.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import Any

from prefalign.config import ConfigError
from prefalign.discovery.archive import Archive
from prefalign.discovery.candidate import Candidate, ProposalError
from prefalign.discovery.static_check import FUNCTIONAL, MATH, MAX_CODE_CHARS, TORCH_FUNCTIONS
from prefalign.llm_client import ChatClient, resolve_api_key

# A reply is a JSON object holding code of at most MAX_CODE_CHARS and a short thought: a
# longer one is cut off or garbage, and is refused before any parsing.
MAX_REPLY_CHARS = 4 * MAX_CODE_CHARS
MAX_JSON_DEPTH = 20
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
these functions: torch.{{{", ".join(sorted(TORCH_FUNCTIONS))}}}; \
F.{{{", ".join(sorted(FUNCTIONAL))}}}; \
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
    """Proposals from an OpenAI-compatible chat endpoint (OpenAI, vLLM, llama.cpp, Ollama, ...).

    The API key is read from the environment variable `api_key_env` (None or "NONE": the
    endpoint needs no key). `max_retries` bounds the retries of one request after its first
    attempt; `max_tokens` bounds the reply (a local server otherwise generates until its
    context is full); `json_mode` asks for `response_format: {"type": "json_object"}`
    (grammar-constrained JSON on llama.cpp and vLLM). `max_prompt_chars` bounds the prompt:
    the archive is summarized to fit, and a budget too small for the fixed instructions is
    refused when the proposer is built.
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
        max_tokens: int | None = 1024,
        json_mode: bool = False,
        max_prompt_chars: int = 12_000,
        sleep: Callable[[float], None] = time.sleep,
        log: Callable[[str], None] | None = None,
    ) -> None:
        minimum = len(SYSTEM_PROMPT) + len(archive_prompt_minimal())
        if max_prompt_chars < minimum:
            raise ConfigError(
                f"LLM proposer: max_prompt_chars={max_prompt_chars} cannot hold the fixed "
                f"instructions ({minimum} characters); raise it (and the endpoint's context)"
            )
        self.client = ChatClient(
            base_url, model, api_key=resolve_api_key(api_key_env, "LLM proposer"),
            max_retries=max_retries, timeout_s=timeout_s, backoff_s=backoff_s,
            max_backoff_s=max_backoff_s, temperature=temperature, max_tokens=max_tokens,
            json_mode=json_mode, max_reply_bytes=2 * MAX_REPLY_CHARS + 4096, who="LLM",
            sleep=sleep,
        )  # fmt: skip
        self.model = model
        self.max_prompt_chars = max_prompt_chars
        self.log = log

    @property
    def attempts(self) -> int:
        """Requests sent over the proposer's life, retries included."""
        return self.client.requests

    def propose(self, archive: Archive, n: int) -> list[Candidate | ProposalError]:
        out: list[Candidate | ProposalError] = []
        for _ in range(n):
            pending = [c for c in out if isinstance(c, Candidate)]
            user, note = fit_prompt(archive, pending, self.max_prompt_chars)
            if note and self.log is not None:
                self.log(f"LLM proposer: {note}")
            messages = [{"role": "system", "content": SYSTEM_PROMPT},
                        {"role": "user", "content": user}]  # fmt: skip
            out.append(self.propose_one(messages))
        return out

    def propose_one(self, messages: list[dict[str, str]]) -> Candidate | ProposalError:
        reply = self.client.complete(messages, parse=lambda text: parse_reply(text, self.origin))
        if reply.ok:
            return reply.value  # type: ignore[return-value]
        if reply.unparsed:
            return ProposalError(
                (reply.error or "").replace("unusable reply", "malformed reply", 1),
                raw=(reply.content or "")[:2000], attempts=reply.attempts, origin=self.origin,
            )  # fmt: skip
        return ProposalError(reply.error or "no reply", attempts=reply.attempts, origin=self.origin)


# Ways to show the archive, from the fullest to the tersest: (best objectives, of them with
# code, code characters each, recent outcomes).
SUMMARY_LEVELS = (
    (5, 5, 1500, 12), (5, 3, 800, 12), (5, 2, 600, 8), (4, 1, 600, 6), (3, 0, 0, 6),
    (3, 0, 0, 3), (1, 0, 0, 1), (0, 0, 0, 0),
)  # fmt: skip
MAX_REASON_IN_PROMPT = 300
CLOSING = (
    "\nPropose ONE new objective that differs from all of the above and could reach a "
    "higher fitness. Learn from the failures. Reply with the JSON object only."
)


def build_messages(
    archive: Archive, pending: list[Candidate] | None = None, max_prompt_chars: int | None = None
) -> list[dict[str, str]]:
    """System prompt (task, signature, rules) and user prompt (the archive so far)."""
    user, _ = fit_prompt(archive, pending or [], max_prompt_chars)
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def fit_prompt(
    archive: Archive, pending: list[Candidate], max_prompt_chars: int | None
) -> tuple[str, str | None]:
    """(user prompt, note): the fullest view of the archive that keeps system + user prompt
    within `max_prompt_chars`; the note says what was left out (None when nothing was)."""
    budget = None if max_prompt_chars is None else max_prompt_chars - len(SYSTEM_PROMPT)
    text = ""
    for level, (top, with_code, code_chars, recent) in enumerate(SUMMARY_LEVELS):
        text = archive_prompt(archive, pending, top, recent, with_code, code_chars)
        if budget is None or len(text) <= budget:
            if level == 0:
                return text, None
            return text, (
                f"archive summarized to fit max_prompt_chars={max_prompt_chars}: best {top} "
                f"({with_code} with code), last {recent} outcomes"
            )
    return archive_prompt_minimal(), (
        f"the archive does not fit max_prompt_chars={max_prompt_chars}: the prompt shows none of it"
    )


def archive_prompt_minimal() -> str:
    return "No objectives are shown (the prompt budget is too small for the archive)." + CLOSING


def archive_prompt(
    archive: Archive,
    pending: list[Candidate],
    top: int = 5,
    recent: int = 12,
    with_code: int | None = None,
    code_chars: int = 1500,
) -> str:
    """The archive as the proposer should see it: best code first, then recent outcomes."""
    parts = []
    board = archive.leaderboard(top) if top else []
    shown_code = top if with_code is None else with_code
    if board:
        parts.append("Best objectives so far (higher fitness is better):")
        by_hash = {r["code_hash"]: r for r in archive.scored()}
        for i, row in enumerate(board):
            code = by_hash[row["code_hash"]]["code"]
            head = (f"\n# {row['rank']}. {row['name']} ({row['origin']}): fitness "
                    f"{row['fitness']:.4g}{_metrics_text(row.get('metrics'))}")  # fmt: skip
            parts.append(head + ("\n" + _clip(code, code_chars) if i < shown_code else ""))
    latest = archive.records[-recent:] if recent else []
    if latest:
        parts.append("\nMost recent proposals and their outcome:")
        for r in latest:
            parts.append(
                f"- {r.get('name') or '(no candidate)'} [{r.get('origin')}]: {_outcome(r)}"
            )
    if len(archive.records) > len(latest) and len(archive.records):
        omitted = len(archive.records) - len(latest)
        parts.append(f"({omitted} earlier proposals not shown)")
    if pending:
        names = ", ".join(c.name for c in pending)
        parts.append("\nAlready proposed in this round (not evaluated yet): " + _clip(names, 300))
    if not parts:
        parts.append("No objectives have been evaluated yet.")
    parts.append(CLOSING)
    return "\n".join(parts)


def parse_reply(content: str, origin: str = "llm") -> Candidate:
    """A Candidate from the reply text; ValueError saying what is wrong otherwise."""
    if len(content) > MAX_REPLY_CHARS:
        raise ValueError(f"the reply is {len(content)} characters (at most {MAX_REPLY_CHARS})")
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
        thought=thought[:2000] if isinstance(thought, str) else "",
        origin=origin,
    )


def _json_object(content: str) -> dict[str, Any]:
    """The reply's JSON object: the whole text, a ```json fenced block, or the outermost {...}.

    Each try is one linear scan and one json.loads; nesting deeper than MAX_JSON_DEPTH is
    refused before parsing (json.loads recurses per level)."""
    texts = [content.strip()]
    fence = content.find("```")
    if fence >= 0:
        close = content.find("```", fence + 3)
        if close > fence:
            block = content[fence + 3 : close]
            texts.append(block[4:] if block.startswith("json") else block)
    start, end = content.find("{"), content.rfind("}")
    if 0 <= start < end:
        texts.append(content[start : end + 1])
    last_error = "no JSON object found"
    for text in texts:
        if _depth(text) > MAX_JSON_DEPTH:
            raise ValueError(f"the JSON is nested deeper than {MAX_JSON_DEPTH} levels")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            last_error = f"invalid JSON ({e.msg} at line {e.lineno} column {e.colno})"
            continue
        if isinstance(data, dict):
            return data
        last_error = f"expected a JSON object, got {type(data).__name__}"
    raise ValueError(last_error)


def _depth(text: str) -> int:
    """An upper bound on the bracket nesting of a JSON text (brackets in strings count too)."""
    depth = deepest = 0
    for match in re.finditer(r"[\[\]{}]", text):
        depth += 1 if match.group() in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def _strip_fence(code: str) -> str:
    match = re.fullmatch(r"\s*```(?:python)?\s*\n(.*?)\n?```\s*", code, re.DOTALL)
    return match.group(1) if match else code


def _outcome(record: dict[str, Any]) -> str:
    if record.get("valid") and record.get("same_behaviour_as"):
        return (
            f"fitness {record['fitness']:.4g}: computes exactly the same loss as "
            f"{record['same_behaviour_as']!r}; propose something that behaves differently"
        )
    if record.get("valid") and record.get("fitness") is not None:
        return f"fitness {record['fitness']:.4g}{_metrics_text(record.get('metrics'))}"
    return f"FAILED: {_clip(str(record.get('reason')), MAX_REASON_IN_PROMPT)}"


def _metrics_text(metrics: dict[str, Any] | None) -> str:
    shown = [f"{k} {v:.4g}" for k, v in (metrics or {}).items() if isinstance(v, (int, float))]
    return f" ({', '.join(shown[:4])})" if shown else ""


def _clip(text: str, limit: int = 1500) -> str:
    return text if len(text) <= limit else text[:limit] + "\n# ...(cut)"
