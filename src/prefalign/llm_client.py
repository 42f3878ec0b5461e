"""One OpenAI-compatible chat-completions client with bounded retries, for the judge and the
discovery proposer.

Standard library only (http.client), so every failure is ours to classify:
- a reply body is read in chunks up to `max_reply_bytes` and against one wall-clock deadline
  per attempt (`timeout_s`), so a server that trickles bytes or answers megabytes cannot hold
  the caller; it is parsed once with `json.loads` (linear time);
- transient failures are retried with exponential backoff (honouring Retry-After, capped),
  at most `max_retries` times after the first attempt: timeouts, connection errors, 408/409/
  429, 5xx (except a 5xx whose body says the request itself is invalid, as llama.cpp's server
  answers an unsupported `response_format`), and a 200 whose body is not a chat completion
  (garbled or cut-off JSON);
- error messages come from any body shape: OpenAI's `{"error": {"message"}}`, FastAPI's
  `{"detail": ...}`, a bare `{"message"}`, or the text itself;
- a caller may reject a reply it cannot use (`parse` raising ValueError); with
  `retry_unparsed` that attempt counts as failed too, and the next one is sent at a higher
  temperature with a reminder of the format, since at temperature 0 a server returns the same
  text again.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from prefalign.errors import UserError

T = TypeVar("T")

RETRY_STATUS = frozenset({408, 409, 429}) | frozenset(range(500, 600))
# Words by which a 5xx body says the request, not the server, is at fault.
_INVALID_REQUEST = re.compile(
    r"invalid[_ ]request|invalid_request_error|not supported|unsupported|"
    r"validation error|bad request|invalid (value|parameter|argument|schema|format)",
    re.IGNORECASE,
)
NO_KEY = ("", "none", "null")  # api_key_env values that mean: the endpoint needs no key
MAX_ERROR_CHARS = 200
# Temperatures of the retries after an unusable reply (the first attempt uses the caller's).
RETRY_TEMPERATURES = (0.7, 1.0)
FORMAT_REMINDER = "Your previous reply could not be used: {reason}. Answer again, following " \
    "the required format exactly."  # fmt: skip


class LLMConfigError(UserError, ValueError):
    """The client cannot be built as configured (e.g. the API key variable is unset)."""


def resolve_api_key(api_key_env: str | None, who: str) -> str | None:
    """The key from the environment variable `api_key_env`; None, "" or "NONE": no key."""
    if api_key_env is None or api_key_env.strip().lower() in NO_KEY:
        return None
    key = os.environ.get(api_key_env)
    if not key:
        raise LLMConfigError(
            f"{who}: set the environment variable {api_key_env} to the API key "
            "(or use NONE for an endpoint without keys)"
        )
    return key


@dataclass(frozen=True)
class Completion(Generic[T]):
    """The outcome of one request with its retries: `value` (the parsed reply) or `error`."""

    content: str | None  # the last reply text received, parsed or not
    value: T | None
    attempts: int
    error: str | None = None  # why there is no value
    unparsed: bool = False  # replies came back, none of them usable

    @property
    def ok(self) -> bool:
        return self.error is None


class _Failed(Exception):
    def __init__(self, message: str, retry: bool, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.retry, self.retry_after = retry, retry_after


class ChatClient:
    """POST {base_url}/chat/completions with bounded retries; thread-safe.

    `max_tokens`, `temperature` and `json_mode` (`response_format: {"type": "json_object"}`)
    are the request's defaults; None leaves a parameter out (some endpoints refuse it).
    `extra_body` is merged into every request body (an endpoint's own parameters).
    `requests` counts the HTTP requests sent, retries included.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        max_retries: int = 3,
        timeout_s: float = 30.0,
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        temperature: float | None = None,
        max_tokens: int | None = None,
        json_mode: bool = False,
        max_reply_bytes: int = 1 << 20,
        extra_body: dict[str, Any] | None = None,
        who: str = "LLM",
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if max_retries < 0:
            raise LLMConfigError(f"{who}: max_retries must be >= 0, got {max_retries}")
        if timeout_s <= 0:
            raise LLMConfigError(f"{who}: timeout_s must be > 0, got {timeout_s}")
        if max_tokens is not None and max_tokens < 1:
            raise LLMConfigError(f"{who}: max_tokens must be >= 1, got {max_tokens}")
        url = urllib.parse.urlsplit(base_url.rstrip("/"))
        if url.scheme not in ("http", "https") or not url.hostname:
            raise LLMConfigError(f"{who}: base_url must be an http(s) URL, got {base_url!r}")
        self.url = url
        self.model = model
        self.api_key = api_key
        self.max_retries = max_retries
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.json_mode = json_mode
        self.max_reply_bytes = max_reply_bytes
        self.extra_body = dict(extra_body or {})
        self.who = who
        self.sleep = sleep
        self.requests = 0
        self._lock = threading.Lock()

    def complete(
        self,
        messages: list[dict[str, str]],
        parse: Callable[[str], T] | None = None,
        retry_unparsed: bool = False,
    ) -> Completion[T]:
        """Send `messages`; `parse(text)` turns the reply into a value (ValueError: unusable).

        Without `retry_unparsed` an unusable reply ends the request (the caller feeds it back
        instead); with it, the next attempt is varied (temperature, a format reminder).
        """
        parse = parse or (lambda text: text)  # type: ignore[assignment,return-value]
        error, content, unparsed = "no attempt made", None, False
        retry_after, request_messages, temperature = 0.0, messages, self.temperature
        for attempt in range(1, self.max_retries + 2):
            if attempt > 1:
                delay = min(self.backoff_s * 2 ** (attempt - 2), self.max_backoff_s)
                self.sleep(min(max(delay, retry_after), self.max_backoff_s))
            try:
                content = self._attempt(request_messages, temperature)
            except _Failed as e:
                error, retry_after, unparsed = str(e), e.retry_after, False
                if not e.retry:
                    return Completion(content, None, attempt, f"{error}, not retried")
                continue
            try:
                return Completion(content, parse(content), attempt)  # type: ignore[arg-type]
            except (ValueError, RecursionError) as e:
                reason = str(e) if isinstance(e, ValueError) else "the reply is nested too deeply"
                error, unparsed, retry_after = f"unusable reply: {reason}", True, 0.0
                if not retry_unparsed:
                    return Completion(content, None, attempt, error, unparsed=True)
                # The same request at temperature 0 returns the same text: vary it.
                temperature = RETRY_TEMPERATURES[min(attempt - 1, len(RETRY_TEMPERATURES) - 1)]
                reminder = {"role": "user", "content": FORMAT_REMINDER.format(reason=reason)}
                request_messages = [*messages, {"role": "assistant", "content": content[:2000]},
                                    reminder]  # fmt: skip
        attempts = self.max_retries + 1
        if unparsed:
            return Completion(content, None, attempts, f"{error} (after {attempts} attempts)", True)
        return Completion(
            content, None, attempts, f"{self.who} request failed after {attempts} attempts: {error}"
        )

    # ------------------------------------------------------------ one attempt

    def _body(self, messages: list[dict[str, str]], temperature: float | None) -> bytes:
        body: dict[str, Any] = {"model": self.model, "messages": messages}
        if temperature is not None:
            body["temperature"] = temperature
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        if self.json_mode:
            body["response_format"] = {"type": "json_object"}
        return json.dumps({**body, **self.extra_body}).encode()

    def _attempt(self, messages: list[dict[str, str]], temperature: float | None) -> str:
        """The reply text of one request; _Failed saying whether a retry may help."""
        with self._lock:
            self.requests += 1
        deadline = time.monotonic() + self.timeout_s
        try:
            status, headers, raw = self._post(self._body(messages, temperature), deadline)
        except TimeoutError:
            raise _Failed(f"timed out after {self.timeout_s:g} s", retry=True) from None
        except (OSError, http.client.HTTPException) as e:
            raise _Failed(f"connection error: {_short(str(e) or type(e).__name__)}", True) from None
        if status != 200:
            message = error_message(raw)
            text = f"HTTP {status}: {message}" if message else f"HTTP {status}"
            says_invalid = _INVALID_REQUEST.search(raw[:4096].decode(errors="replace"))
            retry = status in RETRY_STATUS and not (status >= 500 and says_invalid)
            raise _Failed(text, retry, _seconds(headers.get("retry-after")))
        return completion_text(raw)

    def _post(self, body: bytes, deadline: float) -> tuple[int, dict[str, str], bytes]:
        url = self.url
        cls = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
        conn = cls(url.hostname, url.port, timeout=self.timeout_s)  # type: ignore[arg-type]
        headers = {"content-type": "application/json", "accept": "application/json"}
        if self.api_key is not None:
            headers["authorization"] = f"Bearer {self.api_key}"
        try:
            conn.request("POST", f"{url.path}/chat/completions", body, headers)
            response = conn.getresponse()
            chunks, size = [], 0
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                if conn.sock is not None:
                    conn.sock.settimeout(remaining)
                chunk = response.read1(65536)
                if not chunk:
                    break
                size += len(chunk)
                if size > self.max_reply_bytes:
                    raise _Failed(
                        f"reply larger than {self.max_reply_bytes} bytes, not read further",
                        retry=True,
                    )
                chunks.append(chunk)
            return (
                response.status,
                {k.lower(): v for k, v in response.getheaders()},
                b"".join(chunks),
            )
        finally:
            conn.close()


# ---------------------------------------------------------------- reading bodies


def completion_text(raw: bytes) -> str:
    """The first choice's message content of a chat-completion body; _Failed when the body
    is not one (garbled, cut off, an error object with status 200)."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        head = raw[:80].decode(errors="replace")
        raise _Failed(f"malformed response: the body is not JSON ({head!r})", True) from None
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        message = error_message(raw)
        what = f" ({message})" if message else ""
        raise _Failed(f"malformed response: no choices{what}", True)
    message = choices[0].get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str):
        raise _Failed("malformed response: the first choice has no message content", True)
    return content


def error_message(raw: bytes) -> str:
    """The message of an error body of any common shape, one line, at most 200 characters."""
    text = raw.decode(errors="replace")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return _short(text)
    for _ in range(3):  # {"error": {"message": ...}}, {"detail": [{"msg": ...}]}, ...
        if isinstance(data, dict):
            inner = next((data[k] for k in ("error", "detail", "message", "msg") if k in data),
                         None)  # fmt: skip
            if inner is None:
                break
            data = inner
        elif isinstance(data, list) and data:
            data = data[0]
        else:
            break
    return _short(data if isinstance(data, str) else json.dumps(data))


def _short(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _seconds(value: str | None) -> float:
    """A Retry-After header in seconds (0 when absent or an HTTP date)."""
    try:
        return max(0.0, float(value)) if value else 0.0
    except ValueError:
        return 0.0
