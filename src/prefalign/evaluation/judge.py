"""LLM-judge pairwise win rate of a policy's answers against reference answers.

The practice of AlpacaEval 2 and Arena-Hard: for each prompt a judge model sees the policy's
answer and a reference answer and names the better one. Every prompt is judged twice, once
with the policy's answer shown first and once with it second, and the prompt's score is the
mean of the two (win 1, tie 0.5, loss 0), so a judge that favours a position cancels out.

Beside the raw win rate we report a length-controlled one, because judges favour longer
answers. Per judgment j we fit a logistic regression (ties as y = 0.5)

    logit P(policy preferred in j) = theta + phi * tanh(d_j / sigma) + psi * s_j

where d_j = len(policy answer) - len(reference answer) in characters, sigma = the standard
deviation of d over the prompts, and s_j = +1 when the policy's answer is shown first, -1
when second. The length-controlled win rate is sigmoid(theta): the predicted win probability
at zero length difference, averaged over the two positions. (AlpacaEval 2 fits the same tanh
length term; it also adds a per-instruction difficulty term, which needs many models.)
Both 95% intervals are percentile bootstraps over prompts with a fixed seed.

Any OpenAI-compatible endpoint serves as the judge (prefalign.llm_client); requests run
`concurrency` at a time, transient failures (429, 5xx, timeouts, connection errors, garbled
bodies) are retried with exponential backoff at most `max_retries` times, and a reply with no
verdict is retried at a higher temperature. A judgment that still fails, or never parses, is
recorded and counted (`failed`, `unparsed`), left out of the win rates, and not cached; every
verdict is cached on disk (one JSON file per judge model, prompt and ordered pair of answers),
so a rerun asks only for what is missing.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from prefalign.config import ConfigError
from prefalign.errors import UserError
from prefalign.io import atomic_write
from prefalign.llm_client import ChatClient, resolve_api_key

PREFERENCE = {"win": 1.0, "tie": 0.5, "loss": 0.0}

SYSTEM_PROMPT = """You are an impartial judge of answers written by AI assistants. You are \
shown a user's prompt and two responses, A and B. Decide which response answers the prompt \
better: more helpful, correct, relevant and clear. The order in which the responses are \
shown and their lengths must not influence you. Explain your reasoning in at most three \
sentences, then write your verdict on the last line, exactly one of:
[[A]] if response A is better,
[[B]] if response B is better,
[[TIE]] if they are equally good."""

USER_TEMPLATE = """[User prompt]
{prompt}
[End of user prompt]

[Response A]
{first}
[End of response A]

[Response B]
{second}
[End of response B]"""

# With json_mode the verdict comes as JSON (grammar-constrained on llama.cpp and vLLM).
JSON_INSTRUCTION = """

Reply with one JSON object and nothing else: {"reasoning": "<at most three sentences>", \
"verdict": "A" or "B" or "TIE"}."""

# Changing the wording changes the verdicts: the cache key includes this hash.
TEMPLATE_ID = hashlib.sha256((SYSTEM_PROMPT + USER_TEMPLATE).encode()).hexdigest()[:16]
JSON_TEMPLATE_ID = hashlib.sha256(
    (SYSTEM_PROMPT + JSON_INSTRUCTION + USER_TEMPLATE).encode()
).hexdigest()[:16]

_VERDICT = re.compile(r"\[\[\s*(A\s*>>?\s*B|B\s*>>?\s*A|A\s*=\s*B|A|B|TIE|C)\s*\]\]", re.IGNORECASE)
_BARE = {"A": "A", "B": "B", "TIE": "TIE", "C": "TIE"}


class JudgeError(UserError, RuntimeError):
    """Judgments failed for good (with on_error="raise"): the message says how many and why."""


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "prefalign" / "judge"


@dataclass
class JudgeConfig:
    """Where the judge lives and how to talk to it.

    `api_key_env` names the environment variable with the key (None or "NONE": the endpoint
    needs no key). `max_retries` bounds the retries of one judgment after its first attempt;
    a reply with no verdict in it is retried too, at a higher temperature. A judgment that
    fails every attempt is counted in `failed`, one that never parses in `unparsed`; both
    are left out of the win rates and not cached. `on_error="skip"` finishes the evaluation
    with them counted; "raise" stops with JudgeError once every request has finished
    (finished verdicts stay cached, so a rerun only repeats the failures). `json_mode` asks
    for `response_format: {"type": "json_object"}` and a JSON verdict. `cache_dir=None`
    disables the cache.
    """

    base_url: str
    model: str
    api_key_env: str | None = "OPENAI_API_KEY"
    concurrency: int = 4
    max_retries: int = 3
    timeout_s: float = 60.0
    cache_dir: str | Path | None = field(default_factory=default_cache_dir)
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    temperature: float = 0.0
    max_tokens: int | None = 512
    on_error: Literal["raise", "skip"] = "skip"
    json_mode: bool = False
    n_bootstrap: int = 1000
    seed: int = 0
    progress: bool = False

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ConfigError(f"judge: concurrency must be >= 1, got {self.concurrency}")
        if self.max_retries < 0:
            raise ConfigError(f"judge: max_retries must be >= 0, got {self.max_retries}")
        if self.on_error not in ("raise", "skip"):
            raise ConfigError(f"judge: on_error must be 'raise' or 'skip', got {self.on_error!r}")
        if self.timeout_s <= 0:
            raise ConfigError(f"judge: timeout_s must be > 0, got {self.timeout_s}")


@dataclass
class Judgment:
    """One judge call: the policy's answer shown first ("policy_first") or second."""

    order: Literal["policy_first", "reference_first"]
    verdict: str  # as the judge saw the positions: "A", "B" or "TIE"
    preference: float  # for the policy: 1 win, 0.5 tie, 0 loss
    cached: bool
    flag: str | None = None
    reply: str = ""


@dataclass
class PromptJudgment:
    index: int
    prompt: str
    length_diff: int  # characters, policy minus reference
    judgments: list[Judgment]
    failed: int = 0  # judgments lost to errors
    unparsed: int = 0  # judgments whose replies never held a verdict
    errors: list[str] = field(default_factory=list)  # why, one line per lost judgment

    @property
    def score(self) -> float | None:
        """Mean preference over the orders judged; None when every judgment failed."""
        if not self.judgments:
            return None
        return sum(j.preference for j in self.judgments) / len(self.judgments)


@dataclass
class WinRateResult:
    win_rate: float
    win_rate_ci: tuple[float, float]
    lc_win_rate: float
    lc_ci: tuple[float, float]
    n: int  # prompts with at least one judgment
    wins: int  # prompts whose score is above 0.5
    losses: int
    ties: int
    per_prompt: list[PromptJudgment]
    cache_hits: int  # judgments read from the cache
    requests: int  # HTTP requests sent, retries included
    unparsed: int = 0
    failed: int = 0
    position_consistency: float = float("nan")  # share of prompts whose two verdicts agree
    length_slope: float = float("nan")  # phi of the length model
    judge: str = ""

    def summary(self) -> dict[str, Any]:
        """Everything but the per-prompt records, rounded for tables and JSON (NaN: None)."""
        out = {k: v for k, v in asdict(self).items() if k != "per_prompt"}
        return {k: _round(v) for k, v in out.items()}


def _round(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4) if math.isfinite(value) else None
    if isinstance(value, (tuple, list)):
        return [_round(v) for v in value]
    return value


# --- parsing ---------------------------------------------------------------------------------


def parse_verdict(text: str | None) -> str | None:
    """ "A", "B" or "TIE" from a judge's reply; the last [[...]] token wins; None if absent.

    Accepts [[A]], [[B]], [[TIE]] (or [[C]], MT-Bench's tie), Arena-Hard's [[A>B]], [[A>>B]],
    [[A=B]], and a reply that is nothing but the bare token.
    """
    if not text:
        return None
    json_verdict = _json_verdict(text)
    if json_verdict is not None:
        return json_verdict
    found = _VERDICT.findall(text)
    if found:
        token = re.sub(r"\s+", "", found[-1]).upper()
        if token.startswith("A>"):
            return "A"
        if token.startswith("B>"):
            return "B"
        return _BARE.get(token, "TIE")
    return _BARE.get(text.strip().strip(".*").upper())


def _json_verdict(text: str) -> str | None:
    """The verdict of a JSON reply {"verdict": "A" | "B" | "TIE"}; None if it is not one."""
    stripped = text.strip()
    if not (stripped.startswith("{") and stripped.endswith("}")) or len(stripped) > 20_000:
        return None
    try:
        data = json.loads(stripped)
    except (ValueError, RecursionError):
        return None
    verdict = data.get("verdict") if isinstance(data, dict) else None
    if not isinstance(verdict, str):
        return None
    token = re.sub(r"[\s\[\].*]", "", verdict).upper()
    return _BARE.get(token)


def build_messages(
    prompt: str, first: str, second: str, json_mode: bool = False
) -> list[dict[str, str]]:
    user = USER_TEMPLATE.format(prompt=prompt, first=first, second=second)
    system = SYSTEM_PROMPT + (JSON_INSTRUCTION if json_mode else "")
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def cache_key(model: str, prompt: str, first: str, second: str, json_mode: bool = False) -> str:
    """sha256 of the judge model, the template, the prompt and the answers in shown order."""
    template = JSON_TEMPLATE_ID if json_mode else TEMPLATE_ID
    blob = json.dumps([model, template, prompt, first, second], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


# --- the cache -------------------------------------------------------------------------------


class VerdictCache:
    """One JSON file per key under `root/<key[:2]>/`; written atomically so threads may share it."""

    def __init__(self, root: str | Path | None) -> None:
        self.root = Path(root) if root is not None else None

    def _path(self, key: str) -> Path:
        assert self.root is not None
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        if self.root is None:
            return None
        try:
            record = json.loads(self._path(key).read_text())
        except (OSError, json.JSONDecodeError):
            return None  # absent or torn: ask again
        return record if isinstance(record, dict) and "verdict" in record else None

    def put(self, key: str, record: dict[str, Any]) -> None:
        if self.root is None:
            return
        atomic_write(self._path(key), json.dumps(record))


# --- the client ------------------------------------------------------------------------------


def _require_verdict(text: str) -> str:
    verdict = parse_verdict(text)
    if verdict is None:
        raise ValueError("no verdict ([[A]], [[B]] or [[TIE]]) in the reply")
    return verdict


class _Judge:
    """Sends one judgment with bounded retries (the shared chat client); counts requests."""

    def __init__(self, config: JudgeConfig) -> None:
        self.client = ChatClient(
            config.base_url, config.model, api_key=resolve_api_key(config.api_key_env, "judge"),
            max_retries=config.max_retries, timeout_s=config.timeout_s,
            backoff_s=config.backoff_s, max_backoff_s=config.max_backoff_s,
            temperature=config.temperature, max_tokens=config.max_tokens,
            json_mode=config.json_mode, max_reply_bytes=1 << 20, who="judge",
        )  # fmt: skip
        self.config = config

    @property
    def requests(self) -> int:
        return self.client.requests

    def verdict(self, messages: list[dict[str, str]]) -> tuple[str | None, str, str | None]:
        """(verdict or None, last reply, None or why there is no verdict: the error, or
        "unparsed: ..." when replies came but none held a verdict)."""
        reply = self.client.complete(messages, parse=_require_verdict, retry_unparsed=True)
        if reply.ok:
            return reply.value, reply.content or "", None
        if reply.unparsed:
            return None, reply.content or "", f"unparsed: {reply.error}"
        return None, reply.content or "", reply.error


# --- win rates -------------------------------------------------------------------------------


def judge_pairwise(
    prompts: Sequence[str],
    answers_a: Sequence[str],
    answers_b: Sequence[str],
    config: JudgeConfig,
) -> WinRateResult:
    """Win rate of `answers_a` (the policy's) over `answers_b` (the reference's), both orders.

    Returns the raw and the length-controlled win rate (formula in the module docstring) with
    95% bootstrap intervals, counts of prompt-level wins/losses/ties, and every judgment.
    """
    if not (len(prompts) == len(answers_a) == len(answers_b)):
        raise ValueError(
            f"judge: {len(prompts)} prompts, {len(answers_a)} policy answers and "
            f"{len(answers_b)} reference answers; they must match one to one"
        )
    if not prompts:
        raise ValueError("judge: no prompts to judge")
    cache = VerdictCache(config.cache_dir)
    # Both orders of every prompt; identical (prompt, first, second) triples are asked once.
    tasks: dict[str, tuple[str, str, str]] = {}
    plan: list[list[tuple[str, str]]] = []
    for prompt, a, b in zip(prompts, answers_a, answers_b, strict=True):
        row = []
        for order, first, second in (("policy_first", a, b), ("reference_first", b, a)):
            key = cache_key(config.model, prompt, first, second, config.json_mode)
            tasks.setdefault(key, (prompt, first, second))
            row.append((order, key))
        plan.append(row)

    verdicts: dict[str, dict[str, Any]] = {}
    pending = []
    for key in tasks:
        hit = cache.get(key)
        if hit is not None:
            verdicts[key] = {**hit, "cached": True}
        else:
            pending.append(key)
    judge = _Judge(config) if pending else None
    errors: dict[str, str] = {}
    if judge is not None:
        _run_pending(judge, cache, pending, tasks, verdicts, errors, config)
    if errors and config.on_error == "raise":
        first = next(iter(errors.values()))
        done = len(pending) - len(errors)
        raise JudgeError(
            f"{len(errors)} of {len(pending)} judgments failed (first: {first}); the other "
            f"{done} are cached, so a rerun repeats only the failures"
        )

    per_prompt = []
    for i, (prompt, a, b, row) in enumerate(zip(prompts, answers_a, answers_b, plan, strict=True)):
        entry = PromptJudgment(i, prompt, len(a) - len(b), [])
        for order, key in row:
            if key not in verdicts:
                why = errors.get(key, "not judged")
                entry.errors.append(f"{order}: {why}")
                if why.startswith("unparsed"):
                    entry.unparsed += 1
                else:
                    entry.failed += 1
                continue
            v = verdicts[key]
            entry.judgments.append(Judgment(
                order, v["verdict"], _preference(order, v["verdict"]), v["cached"],
                v.get("flag"), v.get("reply", ""),
            ))  # fmt: skip
        per_prompt.append(entry)
    result = win_rates(per_prompt, n_bootstrap=config.n_bootstrap, seed=config.seed)
    result.cache_hits = sum(j.cached for p in per_prompt for j in p.judgments)
    result.requests = judge.requests if judge is not None else 0
    result.judge = config.model
    return result


def _run_pending(
    judge: _Judge,
    cache: VerdictCache,
    pending: list[str],
    tasks: dict[str, tuple[str, str, str]],
    verdicts: dict[str, dict[str, Any]],
    errors: dict[str, str],
    config: JudgeConfig,
) -> None:
    def one(key: str) -> None:
        prompt, first, second = tasks[key]
        try:
            verdict, reply, why = judge.verdict(
                build_messages(prompt, first, second, config.json_mode)
            )
        except Exception as e:  # noqa: BLE001 - one judgment's bug must not end the others
            verdict, why = None, f"{type(e).__name__}: {e}"
        if verdict is None:  # failures and unparsed replies are counted, never cached
            errors[key] = why or "no verdict"
            return
        record = {"verdict": verdict, "reply": reply, "flag": None, "judge": config.model,
                  "time": time.time()}  # fmt: skip
        cache.put(key, record)
        verdicts[key] = {**record, "cached": False}

    from tqdm.auto import tqdm

    with ThreadPoolExecutor(max_workers=config.concurrency) as pool:
        futures = [pool.submit(one, key) for key in pending]
        for future in tqdm(futures, desc="judge", disable=not config.progress):
            future.result()


def _preference(order: str, verdict: str) -> float:
    if verdict == "TIE":
        return PREFERENCE["tie"]
    policy_shown_as = "A" if order == "policy_first" else "B"
    return PREFERENCE["win"] if verdict == policy_shown_as else PREFERENCE["loss"]


def win_rates(
    per_prompt: Sequence[PromptJudgment], n_bootstrap: int = 1000, seed: int = 0
) -> WinRateResult:
    """Raw and length-controlled win rates with bootstrap intervals, from judged prompts."""
    judged = [p for p in per_prompt if p.judgments]
    if not judged:  # every judgment failed or never parsed: the counts say so
        nan = float("nan")
        return WinRateResult(
            nan, (nan, nan), nan, (nan, nan), 0, 0, 0, 0, list(per_prompt), 0, 0,
            unparsed=sum(p.unparsed for p in per_prompt),
            failed=sum(p.failed for p in per_prompt),
        )  # fmt: skip
    scores = np.array([p.score for p in judged], dtype=float)
    diffs = np.array([p.length_diff for p in judged], dtype=float)
    sigma = float(diffs.std())
    lengths = np.tanh(diffs / sigma) if sigma > 0 else np.zeros_like(diffs)
    # Per prompt: the judgments' rows of the design matrix [1, length, position] and targets.
    rows = [
        (
            np.array(
                [[1.0, lengths[i], 1.0 if j.order == "policy_first" else -1.0] for j in p.judgments]
            ),
            np.array([j.preference for j in p.judgments]),
        )
        for i, p in enumerate(judged)
    ]
    X = np.concatenate([r[0] for r in rows])
    y = np.concatenate([r[1] for r in rows])
    coef = fit_logistic(X, y)
    rng = np.random.default_rng(seed)
    boot_raw, boot_lc = [], []
    for _ in range(n_bootstrap):
        idx = rng.integers(0, len(judged), len(judged))
        boot_raw.append(scores[idx].mean())
        bx = np.concatenate([rows[i][0] for i in idx])
        by = np.concatenate([rows[i][1] for i in idx])
        boot_lc.append(_sigmoid(fit_logistic(bx, by, init=coef)[0]))
    consistent = [p for p in judged if len(p.judgments) == 2]
    return WinRateResult(
        win_rate=float(scores.mean()),
        win_rate_ci=_percentile_ci(boot_raw, scores.mean()),
        lc_win_rate=_sigmoid(coef[0]),
        lc_ci=_percentile_ci(boot_lc, _sigmoid(coef[0])),
        n=len(judged),
        wins=int((scores > 0.5).sum()),
        losses=int((scores < 0.5).sum()),
        ties=int((scores == 0.5).sum()),
        per_prompt=list(per_prompt),
        cache_hits=0,
        requests=0,
        unparsed=sum(p.unparsed for p in per_prompt),
        failed=sum(p.failed for p in per_prompt),
        position_consistency=(
            sum(p.judgments[0].preference == p.judgments[1].preference for p in consistent)
            / len(consistent)
            if consistent
            else float("nan")
        ),
        length_slope=float(coef[1]),
    )


def fit_logistic(
    X: np.ndarray, y: np.ndarray, l2: float = 1.0, init: np.ndarray | None = None, steps: int = 50
) -> np.ndarray:
    """Newton's method for logistic regression with soft targets y in [0, 1].

    The slopes (columns 1..) get an L2 penalty `l2`, which keeps the fit
    finite when a covariate separates the verdicts (a judge that always picks the longer
    answer, or always position A).
    """
    penalty = np.full(X.shape[1], l2)
    penalty[0] = 1e-4  # barely there: only bounds the intercept when one side wins every time
    w = np.zeros(X.shape[1]) if init is None else np.array(init, dtype=float)
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-np.clip(X @ w, -50, 50)))
        grad = X.T @ (p - y) + penalty * w
        hess = (X * (p * (1 - p))[:, None]).T @ X + np.diag(penalty) + 1e-9 * np.eye(X.shape[1])
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w


def _sigmoid(x: float) -> float:
    return float(1.0 / (1.0 + math.exp(-x)))


def _percentile_ci(samples: Sequence[float], point: float) -> tuple[float, float]:
    if not samples:
        return (float(point), float(point))
    low, high = np.percentile(np.asarray(samples, dtype=float), [2.5, 97.5])
    return (float(low), float(high))
