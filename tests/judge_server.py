"""A scripted OpenAI-compatible chat-completions server on loopback, for judge tests and the benchmark.

Behaviours are consumed one per request from a queue (then ``default`` applies); each is a
:class:`Reply` or a callable ``(request_record) -> Reply``.  Every request is recorded (path,
headers, parsed body, arrival time) so tests can count calls and inspect what was sent.
Only ever binds 127.0.0.1 on an ephemeral port; ``stop()`` shuts it down (use it in a fixture).
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    status: int = 200
    content: str | None = "Comparison: A is clearer.\nMore helpful: A"
    delay: float = 0.0  # seconds before answering (a delay past the client timeout = a timeout)
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None  # overrides the whole JSON body (error bodies)
    prompt_tokens: int = 100
    completion_tokens: int = 20


def verdict(winner: str = "A", label: str = "More helpful", **kw: Any) -> Reply:
    return Reply(content=f"Comparison: one is better.\n{label}: {winner}", **kw)


def rate_limited(retry_after: float = 1.0) -> Reply:
    return Reply(status=429, headers={"Retry-After": f"{retry_after:g}"},
                 body={"error": {"message": "Rate limit reached", "type": "rate_limit", "code": "rate_limit"}})


def server_error(status: int = 500) -> Reply:
    return Reply(status=status, body={"error": {"message": "internal error", "type": "server_error"}})


def slow(seconds: float, winner: str = "A") -> Reply:
    return verdict(winner, delay=seconds)


def garbage(text: str = "I cannot decide, both are fine.") -> Reply:
    return Reply(content=text)


def prefers_position_a(record: "RequestRecord") -> Reply:
    """Always says A, whatever the content (a maximally position-biased judge)."""
    content = record.body["messages"][-1]["content"] if record.body else ""
    label = "Preferred" if "Summary A" in content else "More helpful"
    return verdict("A", label=label)


def echo_key_401(record: "RequestRecord") -> Reply:
    """Like a real endpoint that quotes the (bad) key back in its 401 error message."""
    auth = record.headers.get("authorization", "")
    key = auth.removeprefix("Bearer ").strip()
    return Reply(status=401, body={"error": {"message": f"Incorrect API key provided: {key}", "type": "invalid_request_error"}})


Behaviour = Reply | Callable[["RequestRecord"], Reply]


@dataclass
class RequestRecord:
    path: str
    headers: dict[str, str]  # names lower-cased
    raw_body: bytes
    body: Any
    t: float


class JudgeServer:
    def __init__(self, default: Behaviour | None = None) -> None:
        self.default: Behaviour = default if default is not None else verdict("A")
        self.script: deque[Behaviour] = deque()
        self.requests: list[RequestRecord] = []
        self._lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go in two writes: avoid a 40 ms delayed-ACK stall

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length", "0") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = None
                record = RequestRecord(self.path, {k.lower(): v for k, v in self.headers.items()}, raw, body, time.monotonic())
                with server._lock:
                    server.requests.append(record)
                    behaviour = server.script.popleft() if server.script else server.default
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    reply = behaviour(record) if callable(behaviour) else behaviour
                    if not self.path.rstrip("/").endswith("/chat/completions"):
                        reply = Reply(status=404, body={"error": {"message": f"no route {self.path}"}})
                    if reply.delay:
                        time.sleep(reply.delay)
                    self._send(reply, body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout)
                finally:
                    with server._lock:
                        server.in_flight -= 1

            def _send(self, reply: Reply, request_body: Any) -> None:
                if reply.body is not None:
                    payload = reply.body
                else:
                    payload = {
                        "id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()),
                        "model": (request_body or {}).get("model", "test"),
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": reply.content}}],
                        "usage": {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                                  "total_tokens": reply.prompt_tokens + reply.completion_tokens},
                    }
                data = json.dumps(payload).encode()
                self.send_response(reply.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="judge-server", daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> "JudgeServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def push(self, *behaviours: Behaviour) -> None:
        with self._lock:
            self.script.extend(behaviours)

    @property
    def calls(self) -> int:
        with self._lock:
            return len(self.requests)

    def __enter__(self) -> "JudgeServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
