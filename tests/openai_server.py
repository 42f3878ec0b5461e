"""A scripted OpenAI-compatible chat-completions server on 127.0.0.1 for tests.

A real HTTP server (http.server in a thread) that answers POST /v1/chat/completions from a
queue of scripted replies and records every request it receives:

    with ScriptedOpenAIServer() as server:
        server.push_json({"thought": "...", "name": "x", "code": "..."})  # content = that JSON
        server.push_text("not json")                                     # content = raw text
        server.push_status(429)                                          # an HTTP error
        server.push_delay(2.0, then=Reply.text("late"))                  # answer after 2 s
        server.push(Reply.raw(b"<html>", status=200))                   # a body sent as-is
        client = openai.OpenAI(base_url=server.base_url, api_key="test")
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    """One scripted answer: a chat completion with `content`, or an HTTP error `status`."""

    content: str | None = None
    status: int = 200
    delay_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None  # sent as it is instead of a completion or an error object

    @staticmethod
    def json(obj: Any) -> Reply:
        return Reply(content=json.dumps(obj))

    @staticmethod
    def text(text: str) -> Reply:
        return Reply(content=text)

    @staticmethod
    def error(status: int, headers: dict[str, str] | None = None) -> Reply:
        return Reply(status=status, headers=headers or {})

    @staticmethod
    def raw(body: bytes, status: int = 200) -> Reply:
        """Any body (garbled JSON, an error object of another shape) with any status."""
        return Reply(status=status, body=body)


@dataclass
class RecordedRequest:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]

    @property
    def prompt(self) -> str:
        """All message contents of a chat request, joined."""
        return "\n".join(str(m.get("content", "")) for m in self.body.get("messages", []))


class ScriptedOpenAIServer:
    """Context manager: starts on a free port of 127.0.0.1, stops (and unblocks delays) on exit."""

    def __init__(self, replies: list[Reply] | None = None) -> None:
        self.replies: deque[Reply] = deque(replies or [])
        self.requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> ScriptedOpenAIServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    # ------------------------------------------------------------ scripting

    def push(self, *replies: Reply) -> None:
        with self._lock:
            self.replies.extend(replies)

    def push_json(self, obj: Any) -> None:
        self.push(Reply.json(obj))

    def push_text(self, text: str) -> None:
        self.push(Reply.text(text))

    def push_status(self, status: int, headers: dict[str, str] | None = None) -> None:
        self.push(Reply.error(status, headers))

    def push_delay(self, seconds: float, then: Reply) -> None:
        """Answer the next request with `then`, but only after `seconds` (to force a timeout)."""
        self.push(Reply(then.content, then.status, seconds, then.headers, then.body))

    @property
    def remaining(self) -> int:
        with self._lock:
            return len(self.replies)

    # ------------------------------------------------------------ serving

    def _next(self, request: RecordedRequest) -> Reply:
        with self._lock:
            self.requests.append(request)
            if self.replies:
                return self.replies.popleft()
        return Reply(status=500, content=None, headers={"x-script": "exhausted"})

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw or b"{}")
                except json.JSONDecodeError:
                    body = {"_raw": raw.decode(errors="replace")}
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._send(
                        404, {"error": {"message": f"no route {self.path}", "type": "not_found"}}
                    )
                    return
                reply = server._next(RecordedRequest(self.path, dict(self.headers), body))
                if reply.delay_s and server._closing.wait(reply.delay_s):
                    return  # the server is shutting down: drop the late answer
                if reply.body is not None:
                    self._send_bytes(reply.status, reply.body, reply.headers)
                    return
                if reply.status != 200:
                    message = reply.headers.get("x-script") or f"scripted error {reply.status}"
                    self._send(
                        reply.status,
                        {"error": {"message": message, "type": "scripted"}},
                        reply.headers,
                    )
                    return
                self._send(200, _completion(body.get("model", "scripted"), reply.content or ""))

            def _send(
                self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None
            ) -> None:
                self._send_bytes(status, json.dumps(payload).encode(), headers)

            def _send_bytes(
                self, status: int, data: bytes, headers: dict[str, str] | None = None
            ) -> None:
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    for key, value in (headers or {}).items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout): nothing to answer

        return Handler


def _completion(model: str, content: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-scripted-{time.monotonic_ns()}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }
