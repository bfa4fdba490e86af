"""A loopback Kubernetes API server for TrainJobs: just enough REST for the real ``kubernetes`` client.

Serves ``/apis/trainer.kubeflow.org/v1alpha1/namespaces/{ns}/trainjobs`` (POST: create) and
``.../trainjobs/{name}`` (GET, DELETE) from an in-memory store, and ``/api/v1/namespaces/{ns}/pods/{name}``
(GET: the pods in :attr:`TrainJobApi.pods`, for the launcher's own run-id label),
``/api/v1/namespaces/{ns}/persistentvolumeclaims/{name}`` (GET: :attr:`TrainJobApi.claims`) and the
discovery document of ``trainer.kubeflow.org/v1alpha1`` (404 unless :attr:`TrainJobApi.trainer_installed`),
answering as the API server does (the object, or a ``Status`` with code, reason and message). A created job's ``status``
follows a script: the n-th GET of it answers ``script[min(n, len - 1)]`` (a status mapping, or a
callable ``(job) -> status``), so the last entry repeats. Faults are injected per method from a
queue (:class:`Fault`); every request is recorded (method, path, query, body).

Only binds 127.0.0.1, on an ephemeral port. The loops are bounded: the serving thread stops on
:meth:`stop` (use it in a fixture), and past ``max_requests`` every answer is a 500 — a client
polling forever fails its test instead of spinning.

Not a test module: imported as ``from k8s_api_server import ...`` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import json
import re
import threading
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

_ROUTE = re.compile(r"/apis/trainer\.kubeflow\.org/v1alpha1/namespaces/(?P<ns>[^/]+)/trainjobs(?:/(?P<name>[^/]+))?")
_POD = re.compile(r"/api/v1/namespaces/(?P<ns>[^/]+)/pods/(?P<name>[^/]+)")
_PVC = re.compile(r"/api/v1/namespaces/(?P<ns>[^/]+)/persistentvolumeclaims/(?P<name>[^/]+)")
_TRAINER_GROUP = "/apis/trainer.kubeflow.org/v1alpha1"
_KFP = re.compile(r"/apis/pipelines\.kubeflow\.org/v2beta1/namespaces/(?P<ns>[^/]+)"
                  r"/(?P<plural>pipelines|pipelineversions)(?:/(?P<name>[^/]+))?")
_REASONS = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 409: "AlreadyExists",
            422: "Invalid", 429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable"}
_MAX_BODY = 10 * 1024 * 1024

Status = Mapping[str, Any] | Callable[[dict[str, Any]], Mapping[str, Any]]


@dataclass(frozen=True)
class Fault:
    """Answer one request with ``status`` instead; ``after_applying``: do the request first (a lost reply)."""

    status: int
    message: str = "injected fault"
    after_applying: bool = False


@dataclass
class Record:
    method: str
    path: str
    query: dict[str, list[str]]
    body: Any


def condition(kind: str, reason: str, message: str, status: str = "True") -> dict[str, Any]:
    return {"type": kind, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": "2026-01-01T00:00:00Z"}


def running(active: int = 2, ready: int = 2) -> dict[str, Any]:
    return {"conditions": [condition("Suspended", "Resumed", "TrainJob is resumed", "False")],
            "jobsStatus": [{"name": "node", "active": active, "ready": ready, "succeeded": 0, "failed": 0,
                            "suspended": 0}]}


def complete() -> dict[str, Any]:
    return {"conditions": [condition("Complete", "JobSetCompleted", "jobset completed successfully")],
            "jobsStatus": [{"name": "node", "active": 0, "ready": 0, "succeeded": 1, "failed": 0, "suspended": 0}]}


def failed(reason: str = "FailedJobs", message: str = "jobset failed due to FailedJobs") -> dict[str, Any]:
    return {"conditions": [condition("Failed", reason, message)],
            "jobsStatus": [{"name": "node", "active": 0, "ready": 0, "succeeded": 0, "failed": 1, "suspended": 0}]}


@dataclass
class TrainJobApi:
    """The server's state; :meth:`start` serves it, ``host`` is the URL to give the client."""

    script: list[Status] = field(default_factory=lambda: [complete()])
    faults: dict[str, deque[Fault]] = field(default_factory=dict)
    max_requests: int = 500
    jobs: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    pods: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)  # (namespace, name) -> labels
    kfp_objects: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)  # (plural, ns, name)
    claims: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)  # (namespace, name) -> PVC spec+status
    trainer_installed: bool = True  # Kubeflow Trainer's API group is served (discovery answers it)
    requests: list[Record] = field(default_factory=list)
    gets: int = 0
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def inject(self, method: str, *faults: Fault) -> None:
        self.faults.setdefault(method, deque()).extend(faults)

    def calls(self, method: str) -> list[Record]:
        return [r for r in self.requests if r.method == method]

    @property
    def host(self) -> str:
        assert self._server is not None, "start() the server first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> TrainJobApi:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's names)
                api._handle(self, "POST")

            def do_GET(self) -> None:  # noqa: N802
                api._handle(self, "GET")

            def do_DELETE(self) -> None:  # noqa: N802
                api._handle(self, "DELETE")

            def log_message(self, *args: Any) -> None:  # keep pytest's output clean
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)  # shutdown() returned once serve_forever did: a hang guard only

    # ------------------------------------------------------------------ requests

    def _handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        url = urlsplit(handler.path)
        length = min(int(handler.headers.get("Content-Length") or 0), _MAX_BODY)
        raw = handler.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        with self._lock:
            self.requests.append(Record(method, url.path, parse_qs(url.query), body))
            code, answer = self._answer(method, url.path, body)
        data = json.dumps(answer).encode()
        handler.send_response(code)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def _answer(self, method: str, path: str, body: Any) -> tuple[int, dict[str, Any]]:
        if len(self.requests) > self.max_requests:
            return _status(500, f"request budget of {self.max_requests} exhausted: the client polls too long")
        pod = _POD.fullmatch(path)
        if pod and method == "GET":
            if fault := self._next_fault(method):
                return _status(fault.status, fault.message)
            labels = self.pods.get((pod["ns"], pod["name"]))
            if labels is None:
                return _status(404, f'pods "{pod["name"]}" not found')
            return 200, {"kind": "Pod", "apiVersion": "v1", "metadata": {  # every real pod has a UID
                "name": pod["name"], "namespace": pod["ns"], "uid": f"uid-{pod['name']}", "labels": dict(labels)}}
        claim = _PVC.fullmatch(path)
        if claim and method == "GET":
            if fault := self._next_fault(method):
                return _status(fault.status, fault.message)
            pvc = self.claims.get((claim["ns"], claim["name"]))
            if pvc is None:
                return _status(404, f'persistentvolumeclaims "{claim["name"]}" not found')
            return 200, {"kind": "PersistentVolumeClaim", "apiVersion": "v1",
                         "metadata": {"name": claim["name"], "namespace": claim["ns"]}, **pvc}
        if path == _TRAINER_GROUP and method == "GET":  # API discovery: served only when the CRDs are installed
            if not self.trainer_installed:
                return _status(404, "the server could not find the requested resource")
            return 200, {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "trainer.kubeflow.org/v1alpha1",
                         "resources": [{"name": "trainjobs", "singularName": "trainjob", "namespaced": True,
                                        "kind": "TrainJob", "verbs": ["create", "delete", "get", "list", "watch"]}]}
        kfp = _KFP.fullmatch(path)
        if kfp:
            if fault := self._next_fault(method):
                return _status(fault.status, fault.message)
            return self._kfp_object(method, kfp["plural"], kfp["ns"], kfp["name"], body)
        route = _ROUTE.fullmatch(path)
        if not route:
            return _status(404, f"the server could not find the requested resource {path}")
        fault = self._next_fault(method)
        if fault and not fault.after_applying:
            return _status(fault.status, fault.message)
        namespace, name = route["ns"], route["name"]
        code, answer = self._apply(method, namespace, name, body)
        return _status(fault.status, fault.message) if fault else (code, answer)

    def _next_fault(self, method: str) -> Fault | None:
        """The next injected fault for ``method``, taken off its queue (None: answer normally)."""
        queue = self.faults.get(method)
        return queue.popleft() if queue else None

    def _kfp_object(self, method: str, plural: str, namespace: str, name: str | None,
                    body: Any) -> tuple[int, dict[str, Any]]:
        """KFP's Pipeline/PipelineVersion resources: create (409 when the name is taken) and get."""
        if method == "POST" and name is None:
            key = (plural, namespace, body["metadata"]["name"])
            if key in self.kfp_objects:
                return _kfp_object_status(409, plural, key[2], "already exists")
            stored = json.loads(json.dumps(body))
            stored["metadata"].update(uid=f"{plural}-uid-{len(self.kfp_objects)}", resourceVersion="1")
            self.kfp_objects[key] = stored
            return 201, stored
        if method == "GET" and name is not None:
            if (plural, namespace, name) not in self.kfp_objects:
                return _kfp_object_status(404, plural, name, "not found")
            return 200, self.kfp_objects[(plural, namespace, name)]
        return _status(405, f"{method} is not supported here")

    def _apply(self, method: str, namespace: str, name: str | None, body: Any) -> tuple[int, dict[str, Any]]:
        if method == "POST" and name is None:
            key = (namespace, body["metadata"]["name"])
            if key in self.jobs:
                return _status(409, f'trainjobs.trainer.kubeflow.org "{key[1]}" already exists')
            job = json.loads(json.dumps(body))
            job["metadata"].update(uid=f"uid-{len(self.jobs)}", resourceVersion="1",
                                   creationTimestamp="2026-01-01T00:00:00Z")
            self.jobs[key] = job
            return 201, job
        key = (namespace, name or "")
        if name is None or key not in self.jobs:
            return _status(404, f'trainjobs.trainer.kubeflow.org "{name}" not found')
        job = self.jobs[key]
        if method == "GET":
            step = self.script[min(self.gets, len(self.script) - 1)]
            self.gets += 1
            job["status"] = dict(step(job) if callable(step) else step)
            return 200, job
        if method == "DELETE":
            del self.jobs[key]
            return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success",
                         "details": {"name": name, "group": "trainer.kubeflow.org", "kind": "trainjobs"}}
        return _status(405, f"{method} is not supported here")


def _kfp_object_status(code: int, plural: str, name: str, verb: str) -> tuple[int, dict[str, Any]]:
    return _status(code, f'{plural}.pipelines.kubeflow.org "{name}" {verb}')


def _status(code: int, message: str) -> tuple[int, dict[str, Any]]:
    return code, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
                  "reason": _REASONS.get(code, "Unknown"), "code": code}
