"""A scripted OpenAI-compatible chat-completions server on loopback, for judge tests and the benchmark.

Behaviours are consumed one per request from a queue (then ``default`` applies); each is a
:class:`Reply` or a callable ``(request_record) -> Reply``.  Every request is recorded (path,
headers, parsed body, arrival time) so tests can count calls and inspect what was sent.
Only ever binds 127.0.0.1 on an ephemeral port; ``stop()`` shuts it down (use it in a fixture).

The replies follow OpenAI's API reference for ``POST /v1/chat/completions`` (the
``chat.completion`` object with ``choices[].message.content`` and ``usage``; errors as
``{"error": {"message", "type", "code"}}`` with the HTTP status; 429 with ``Retry-After``).

A test that needs the client to time out uses :func:`hang`: the reply waits until the client
closes the connection (or the server stops, or a long hang guard passes), so the client's
timeout is what ends the call, however slow the machine.

A reply the client no longer waits for is its own, counted outcome: just before writing, the
server looks whether the client has closed the connection (a zero-byte peek), and if so marks
the request ``client_gone`` and counts it in ``served_after_client_gave_up`` — a timed-out
request may still be served, which no client can prevent, and tests count it instead of
failing on it.  (The look and the write are not atomic: a client that gives up in between is
missed by this count; tests that need exact figures reconcile with what the client received.)

The judge's tests run its backoffs and Retry-After pauses on ``fake_clock.FakeClock``:
recorded, not waited for.
"""

from __future__ import annotations

import json
import select
import socket
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
    hang: bool = False  # wait until the client gives up (its timeout ends the call), then answer


def verdict(winner: str = "A", label: str = "More helpful", **kw: Any) -> Reply:
    return Reply(content=f"Comparison: one is better.\n{label}: {winner}", **kw)


def rate_limited(retry_after: float = 1.0) -> Reply:
    return Reply(status=429, headers={"Retry-After": f"{retry_after:g}"},
                 body={"error": {"message": "Rate limit reached", "type": "rate_limit", "code": "rate_limit"}})


def server_error(status: int = 500) -> Reply:
    return Reply(status=status, body={"error": {"message": "internal error", "type": "server_error"}})


def slow(seconds: float, winner: str = "A") -> Reply:
    return verdict(winner, delay=seconds)


def hang(winner: str = "A") -> Reply:
    """A reply that comes only after the client has given up: it times out first, whatever the load."""
    return verdict(winner, hang=True)


def quota_exhausted() -> Reply:
    """OpenAI's answer once the account has no credit left: a 429 that no retry can help."""
    return Reply(status=429, body={"error": {"message": "You exceeded your current quota, please check your plan "
                                             "and billing details.", "type": "insufficient_quota",
                                             "code": "insufficient_quota"}})


def garbage(text: str = "I cannot decide, both are fine.") -> Reply:
    return Reply(content=text)


def prefers_position_a(record: RequestRecord) -> Reply:
    """Always says A, whatever the content (a maximally position-biased judge)."""
    content = record.body["messages"][-1]["content"] if record.body else ""
    label = "Preferred" if "Summary A" in content else "More helpful"
    return verdict("A", label=label)


def echo_key_401(record: RequestRecord) -> Reply:
    """Like a real endpoint that quotes the (bad) key back in its 401 error message."""
    auth = record.headers.get("authorization", "")
    key = auth.removeprefix("Bearer ").strip()
    return Reply(status=401, body={"error": {"message": f"Incorrect API key provided: {key}",
                                             "type": "invalid_request_error"}})


Behaviour = Reply | Callable[["RequestRecord"], Reply]
HANG_GUARD_S = 120.0  # a hanging reply waits at most this long for the client to give up
POLL_S = 0.02  # how often a hanging reply looks whether the client has closed the connection


def client_closed(connection: socket.socket) -> bool:
    """Whether the peer has closed the connection (readable, and a peek reads zero bytes)."""
    try:
        readable, _, _ = select.select([connection], [], [], 0)
        return bool(readable) and connection.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


@dataclass
class RequestRecord:
    path: str
    headers: dict[str, str]  # names lower-cased
    raw_body: bytes
    body: Any
    t: float
    client_gone: bool = False  # the client had closed the connection when the reply was written


class JudgeServer:
    def __init__(self, default: Behaviour | None = None, port: int = 0) -> None:
        self.default: Behaviour = default if default is not None else verdict("A")
        self.script: deque[Behaviour] = deque()
        self.requests: list[RequestRecord] = []
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self.in_flight = 0
        self.max_in_flight = 0
        self.served_after_client_gave_up = 0
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
                record = RequestRecord(self.path, {k.lower(): v for k, v in self.headers.items()}, raw, body,
                                       time.monotonic())
                with server._lock:
                    server.requests.append(record)
                    behaviour = server.script.popleft() if server.script else server.default
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    reply = behaviour(record) if callable(behaviour) else behaviour
                    if not self.path.rstrip("/").endswith("/chat/completions"):
                        reply = Reply(status=404, body={"error": {"message": f"no route {self.path}"}})
                    if reply.hang:
                        deadline = time.monotonic() + HANG_GUARD_S
                        while not client_closed(self.connection) and time.monotonic() < deadline:
                            if server._stopping.wait(POLL_S):
                                break
                    if reply.delay:
                        time.sleep(reply.delay)
                    if client_closed(self.connection):
                        record.client_gone = True
                        with server._lock:
                            server.served_after_client_gave_up += 1
                    self._send(reply, body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout)
                finally:
                    with server._lock:
                        server.in_flight -= 1
                        server._idle.notify_all()

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

        class Server(ThreadingHTTPServer):
            request_queue_size = 128  # socketserver's 5 would drop connections under the load test's bursts

        self._httpd = Server(("127.0.0.1", port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="judge-server", daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> JudgeServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # hanging replies end now
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def wait_idle(self, timeout: float = HANG_GUARD_S) -> bool:
        """Wait until no request is being answered (a hanging reply included); False only on a hang."""
        with self._idle:
            return self._idle.wait_for(lambda: self.in_flight == 0, timeout)

    def push(self, *behaviours: Behaviour) -> None:
        with self._lock:
            self.script.extend(behaviours)

    @property
    def calls(self) -> int:
        with self._lock:
            return len(self.requests)

    def __enter__(self) -> JudgeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
