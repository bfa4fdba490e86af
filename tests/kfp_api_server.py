"""A loopback Kubeflow Pipelines API server (v2beta1 REST), enough for the real ``kfp.Client``.

It speaks what ``spo pipeline submit`` makes the client call: healthz; pipelines listed by a
``display_name`` filter, fetched, uploaded (``/pipelines/upload``, multipart, which also makes
the default version, named and described like the pipeline, as the real server does) and
given versions (``/pipelines/upload_version``); pipeline versions listed (paged, newest
first with ``sort_by=created_at desc``); experiments created, listed by name, fetched; runs
created and fetched, each GET moving the run one step along ``run_states`` (the last state
then stays). Every request is recorded (method, path, query, headers, parsed body); a wrong
or missing ``Authorization: Bearer <token>`` gets a 401 on every path but healthz (which the real
API server answers without credentials). Every answer is recorded with its request.
``echo_auth`` makes it quote the received Authorization header in every response's headers
and in its error bodies, like a careless proxy: what the client side must never repeat.
``fail(...)`` scripts error replies. Binds 127.0.0.1 on an ephemeral port; use it as a context
manager.
"""

from __future__ import annotations

import email.parser
import email.policy
import itertools
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

API = "/apis/v2beta1"
_EPOCH = datetime(2025, 1, 1, tzinfo=UTC)


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]  # the last value of each query parameter
    headers: dict[str, str]  # names lower-cased
    body: Any  # JSON, or {field: (filename, bytes)} for a multipart upload
    raw: bytes
    status: int = 0  # the fake's answer: its HTTP status and JSON body
    reply: Any = None


@dataclass
class Fault:
    """Answer ``times`` requests matching method + path regex with ``status`` (after ``action``), once
    ``after`` matching ones have been let through."""

    method: str
    path: str
    status: int
    times: int = 1
    action: Callable[[Request], None] | None = None
    after: int = 0


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class _State:
    pipelines: dict[str, dict] = field(default_factory=dict)
    versions: dict[str, list[dict]] = field(default_factory=dict)
    experiments: dict[str, dict] = field(default_factory=dict)
    runs: dict[str, dict] = field(default_factory=dict)
    recurring_runs: dict[str, dict] = field(default_factory=dict)
    polls: dict[str, int] = field(default_factory=dict)


class KfpApiServer:
    def __init__(self, token: str | None = "kfp-test-token", *, multi_user: bool = False, echo_auth: bool = False,
                 run_states: tuple[str, ...] = ("PENDING", "RUNNING", "SUCCEEDED"),
                 run_error: str = "task train failed: exit code 1", max_page_size: int = 100) -> None:
        self.token = token
        self.multi_user = multi_user
        self.echo_auth = echo_auth
        self.run_states = run_states
        self.run_error = run_error
        self.max_page_size = max_page_size
        self.requests: list[Request] = []
        self.faults: list[Fault] = []
        self.state = _State()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_GET(self) -> None:  # noqa: N802
                self._serve()

            def do_POST(self) -> None:  # noqa: N802
                self._serve()

            def do_DELETE(self) -> None:  # noqa: N802
                self._serve()

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length", "0") or 0)
                raw = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
                request = Request(self.command, parts.path, query, {k.lower(): v for k, v in self.headers.items()},
                                  _parse_body(self.headers.get("Content-Type", ""), raw), raw)
                with server._lock:
                    server.requests.append(request)
                    try:
                        status, payload = 200, server._dispatch(request)
                    except ApiError as err:
                        status, payload = err.status, _error_body(err.status, err.message)
                    except Exception as err:  # a bug here or in a test's fault action: say so in the reply
                        status, payload = 500, _error_body(500, f"test server error: {err!r}")
                    request.status, request.reply = status, payload
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if server.echo_auth:
                    self.send_header("X-Received-Authorization", request.headers.get("authorization", ""))
                self.end_headers()
                self.wfile.write(data)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="kfp-api-server", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> KfpApiServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)  # shutdown() returned once serve_forever did: a hang guard only

    def fail(self, method: str, path: str, status: int, times: int = 1,
             action: Callable[[Request], None] | None = None, after: int = 0) -> None:
        with self._lock:
            self.faults.append(Fault(method, path, status, times, action, after))

    def calls(self, method: str | None = None, path: str | None = None) -> list[Request]:
        """The recorded requests, optionally only those of ``method`` whose path matches regex ``path`` fully."""
        with self._lock:
            return [r for r in self.requests if (method is None or r.method == method)
                    and (path is None or re.fullmatch(path, r.path))]

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    # --- the API -----------------------------------------------------------------------------

    def _dispatch(self, r: Request) -> Any:
        accepted = self.token if isinstance(self.token, tuple) else (self.token,)  # a tuple: during a rotation
        # healthz is a plain handler on the API server's router, outside the authenticated gRPC services
        # (backend/src/apiserver/main.go, buildHTTPRouter, at 2.17.0): it answers without credentials
        public = r.method == "GET" and r.path == f"{API}/healthz"
        if self.token is not None and not public and r.headers.get("authorization") not in {
                f"Bearer {t}" for t in accepted}:
            echoed = f": got {r.headers.get('authorization', '(none)')!r}" if self.echo_auth else ""
            raise ApiError(401, f"Unauthenticated: invalid or missing bearer token{echoed}")
        for fault in self.faults:
            if fault.times > 0 and fault.method == r.method and re.fullmatch(fault.path, r.path):
                if fault.after > 0:
                    fault.after -= 1
                    continue
                fault.times -= 1
                if fault.action:
                    fault.action(r)
                raise ApiError(fault.status, f"scripted HTTP {fault.status}")
        routes: list[tuple[str, str, Callable[..., Any]]] = [
            ("GET", "/healthz", self._healthz),
            ("GET", "/pipelines", self._list_pipelines),
            ("POST", "/pipelines/upload", self._upload),
            ("POST", "/pipelines/upload_version", self._upload_version),
            ("GET", "/pipelines/([^/]+)", self._get_pipeline),
            ("GET", "/pipelines/([^/]+)/versions", self._list_versions),
            ("GET", "/pipelines/([^/]+)/versions/([^/]+)", self._get_version),
            ("POST", "/experiments", self._create_experiment),
            ("GET", "/experiments", self._list_experiments),
            ("GET", "/experiments/([^/]+)", self._get_experiment),
            ("POST", "/runs", self._create_run),
            ("GET", "/runs/([^/:]+)", self._get_run),
            ("POST", "/recurringruns", self._create_recurring_run),
            ("GET", "/recurringruns", self._list_recurring_runs),
            ("DELETE", "/recurringruns/([^/:]+)", self._delete_recurring_run),
        ]
        for method, pattern, handler in routes:
            match = re.fullmatch(API + pattern, r.path)
            if method == r.method and match:
                return handler(r, *match.groups())
        raise ApiError(404, f"no route for {r.method} {r.path}")

    def _healthz(self, r: Request) -> dict:
        return {"commit_sha": "test", "tag_name": "2.17.0", "multi_user": self.multi_user, "pipeline_store": "database"}

    def _list_pipelines(self, r: Request) -> dict:
        found = [p for p in self.state.pipelines.values() if p["namespace"] == r.query.get("namespace", "")]
        return _page(r, "pipelines", _filtered(found, r.query.get("filter")), self.max_page_size)

    def _get_pipeline(self, r: Request, pipeline_id: str) -> dict:
        return self._pipeline(pipeline_id)

    def _upload(self, r: Request) -> dict:
        filename, spec = _uploaded_spec(r)
        name = r.query.get("name") or filename.rsplit(".", 1)[0]
        namespace = r.query.get("namespace", "")
        if self.multi_user and not namespace:
            # 400, not 403: backend/src/apiserver/server/pipeline_upload_server.go at 2.17.0 (UploadPipeline,
            # about lines 118-137) answers StatusBadRequest for a missing namespace and for a refused authorisation
            raise ApiError(400, "shared pipeline upload denied")
        if any(p["display_name"] == name and p["namespace"] == namespace for p in self.state.pipelines.values()):
            raise ApiError(409, "Failed to create a pipeline and a pipeline version")
        return self.add_pipeline(name, spec, r.query.get("description", ""), namespace)

    def add_pipeline(self, name: str, spec: dict, description: str = "", namespace: str = "") -> dict:
        """A pipeline and its default version (named and described like it), as an upload creates."""
        pipeline = {"pipeline_id": self._id("pipeline"), "name": name, "display_name": name,
                    "description": description, "namespace": namespace, "created_at": self._now()}
        self.state.pipelines[pipeline["pipeline_id"]] = pipeline
        self.state.versions[pipeline["pipeline_id"]] = []
        self._add_version(pipeline["pipeline_id"], name, description, spec)
        return pipeline

    def _upload_version(self, r: Request) -> dict:
        filename, spec = _uploaded_spec(r)
        pipeline_id = r.query.get("pipelineid") or ""
        self._pipeline(pipeline_id)
        name = r.query.get("name") or filename.rsplit(".", 1)[0]
        if any(v["name"] == name for v in self.state.versions[pipeline_id]):
            raise ApiError(409, "Failed to create a pipeline version")
        return self._add_version(pipeline_id, name, r.query.get("description", ""), spec)

    def _add_version(self, pipeline_id: str, name: str, description: str, spec: dict) -> dict:
        version = {"pipeline_id": pipeline_id, "pipeline_version_id": self._id("version"), "name": name,
                   "display_name": name, "description": description, "created_at": self._now(),
                   "pipeline_spec": spec}
        self.state.versions[pipeline_id].append(version)
        return version

    def _list_versions(self, r: Request, pipeline_id: str) -> dict:
        self._pipeline(pipeline_id)
        versions = _filtered(self.state.versions[pipeline_id], r.query.get("filter"))
        if r.query.get("sort_by", "") == "created_at desc":
            versions = versions[::-1]
        return _page(r, "pipeline_versions", versions, self.max_page_size)

    def _get_version(self, r: Request, pipeline_id: str, version_id: str) -> dict:
        for version in self.state.versions.get(pipeline_id, []):
            if version["pipeline_version_id"] == version_id:
                return version
        raise ApiError(404, f"pipeline version {version_id} not found")

    def _create_experiment(self, r: Request) -> dict:
        body = r.body or {}
        if not body.get("display_name"):
            raise ApiError(400, "experiment display_name is required")
        if self.multi_user and not body.get("namespace"):
            raise ApiError(400, "namespace is required in multi-user mode")
        experiment = {"experiment_id": self._id("experiment"), "display_name": body["display_name"],
                      "description": body.get("description") or "", "namespace": body.get("namespace") or "",
                      "created_at": self._now(), "storage_state": "AVAILABLE"}
        self.state.experiments[experiment["experiment_id"]] = experiment
        return experiment

    def _list_experiments(self, r: Request) -> dict:
        found = [e for e in self.state.experiments.values() if e["namespace"] == r.query.get("namespace", "")]
        return _page(r, "experiments", _filtered(found, r.query.get("filter")), self.max_page_size)

    def _get_experiment(self, r: Request, experiment_id: str) -> dict:
        if experiment_id not in self.state.experiments:
            raise ApiError(404, f"experiment {experiment_id} not found")
        return self.state.experiments[experiment_id]

    def _create_run(self, r: Request) -> dict:
        body = r.body or {}
        ref = body.get("pipeline_version_reference") or {}
        self._get_version(r, ref.get("pipeline_id", ""), ref.get("pipeline_version_id", ""))
        self._get_experiment(r, body.get("experiment_id", ""))
        run = {**body, "run_id": self._id("run"), "state": self.run_states[0], "created_at": self._now(),
               "storage_state": "AVAILABLE"}
        self.state.runs[run["run_id"]] = run
        self.state.polls[run["run_id"]] = 0
        return run

    def _get_run(self, r: Request, run_id: str) -> dict:
        if run_id not in self.state.runs:
            raise ApiError(404, f"run {run_id} not found")
        state = self.run_states[min(self.state.polls[run_id], len(self.run_states) - 1)]
        self.state.polls[run_id] += 1
        run = {**self.state.runs[run_id], "state": state}
        if state in ("FAILED", "CANCELED"):
            message = self.run_error
            if self.echo_auth:
                message += f" (request had {r.headers.get('authorization', '')})"
            run["error"] = {"code": 2, "message": message, "details": []}
            run["finished_at"] = self._now()
            run["run_details"] = {"task_details": [
                {"task_id": "t1", "display_name": "sft", "state": "SUCCEEDED"},
                {"task_id": "t2", "display_name": "train", "state": state, "error": {"code": 2, "message": message}}]}
        return run

    def _create_recurring_run(self, r: Request) -> dict:
        body = r.body or {}
        ref = body.get("pipeline_version_reference") or {}
        self._get_version(r, ref.get("pipeline_id", ""), ref.get("pipeline_version_id", ""))
        self._get_experiment(r, body.get("experiment_id", ""))
        if not ((body.get("trigger") or {}).get("cron_schedule") or {}).get("cron"):
            raise ApiError(400, "a recurring run needs a trigger")
        job = {**body, "recurring_run_id": self._id("recurring"), "status": "ENABLED", "created_at": self._now()}
        if "max_concurrency" in job:  # an int64: protojson reads a number or a string, and writes a string
            job["max_concurrency"] = str(job["max_concurrency"])
        self.state.recurring_runs[job["recurring_run_id"]] = job
        return job

    def _list_recurring_runs(self, r: Request) -> dict:
        found = [j for j in self.state.recurring_runs.values()
                 if j.get("experiment_id") == r.query.get("experiment_id", j.get("experiment_id"))]
        return _page(r, "recurringRuns", _filtered(found, r.query.get("filter")), self.max_page_size)

    def _delete_recurring_run(self, r: Request, job_id: str) -> dict:
        if self.state.recurring_runs.pop(job_id, None) is None:
            raise ApiError(404, f"recurring run {job_id} not found")
        return {}

    def _pipeline(self, pipeline_id: str) -> dict:
        if pipeline_id not in self.state.pipelines:
            raise ApiError(404, f"pipeline {pipeline_id} not found")
        return self.state.pipelines[pipeline_id]

    def _id(self, kind: str) -> str:
        return f"{kind}-{next(self._ids):04d}"

    def _now(self) -> str:
        """Strictly increasing creation times, so 'newest first' is well defined."""
        return (_EPOCH + timedelta(seconds=len(self.requests))).strftime("%Y-%m-%dT%H:%M:%SZ")


_GRPC = {400: 3, 401: 16, 403: 7, 404: 5, 409: 6, 500: 13, 503: 14}


def _error_body(status: int, message: str) -> dict:
    """The shape of the API server's (grpc-gateway) error replies."""
    return {"error": message, "code": _GRPC.get(status, 2), "message": message, "details": []}


def _parse_body(content_type: str, raw: bytes) -> Any:
    if content_type.startswith("multipart/form-data"):
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {content_type}\r\n\r\n".encode() + raw)
        return {part.get_param("name", header="content-disposition"):
                (part.get_filename(), part.get_payload(decode=True)) for part in message.iter_parts()}
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def _uploaded_spec(r: Request) -> tuple[str, dict]:
    """The upload's file name and pipeline spec (first YAML document); 400 if missing or not a pipeline."""
    upload = (r.body or {}).get("uploadfile") if isinstance(r.body, dict) else None
    if not upload:
        raise ApiError(400, "Failed to read pipeline from file")
    filename, content = upload
    if not filename.endswith((".yaml", ".yml")):
        raise ApiError(400, "unexpected pipeline file format")
    spec = next(yaml.safe_load_all(content), None)
    if not isinstance(spec, dict) or "pipelineInfo" not in spec or "root" not in spec:
        raise ApiError(400, "not a pipeline spec")
    return filename, spec


def _filtered(items: list[dict], raw_filter: str | None) -> list[dict]:
    """Apply a Filter's EQUALS predicates (the operation by name or number, as the API accepts both)."""
    if not raw_filter:
        return list(items)
    for predicate in json.loads(raw_filter).get("predicates", []):
        if predicate.get("operation") not in ("EQUALS", 1):
            raise ApiError(400, f"unsupported filter operation {predicate.get('operation')!r}")
        items = [i for i in items if str(i.get(predicate["key"])) == predicate.get("stringValue")]
    return list(items)


def _page(r: Request, key: str, items: list[dict], max_page_size: int) -> dict:
    size = min(int(r.query.get("page_size") or 10), max_page_size)
    start = int(r.query.get("page_token") or 0)
    end = start + size
    page: dict[str, Any] = {"total_size": len(items)}
    if items[start:end]:  # protojson leaves out an empty repeated field, as the real server's replies do
        page[key] = items[start:end]
    if end < len(items):
        page["next_page_token"] = str(end)
    return page
