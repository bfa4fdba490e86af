"""The KFP fake speaks KFP 2.17's v2beta1 API: every request, every answer, checked against its definition.

The definition is the backend's own Swagger file at tag 2.17.0, vendored in
tests/upstream/kfp-2.17.0/ (SOURCE.md: URL, commit, sha256). The flows below drive the real
``kfp.Client`` through ``spo pipeline submit`` — upload, reuse, a new version, a run followed to
its end, a schedule created and replaced, multi-user — and then every recorded exchange must
match: the path and method exist, the query parameters are declared, a JSON body validates
against the operation's body schema, multipart fields are the declared form fields, and the
fake's answer validates against the 200 response's schema (or ``googleRpcStatus`` for an error).
The schemas are made strict (no undeclared field) for this check, so a field the fake or the
client invents fails it, not only a missing or mistyped one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import secrets
import tempfile
from pathlib import Path
from typing import Any

import jsonschema
import kfp.client.client
import pytest
from conftest import REPO
from kfp_api_server import API, KfpApiServer, Request

from spo.pipelines.submit import submit

SWAGGER = Path(__file__).parent / "upstream" / "kfp-2.17.0" / "kfp_api_single_file.swagger.json"
SWAGGER_SHA256 = "d1468b213c10b0b298159f81656422da6aa086f218ca1531bb5fb720e81da3d9"
PLATFORM = REPO / "configs" / "platform" / "local.yaml"
# Where the served answer is not the generated definition's. healthz is answered by a plain handler
# (backend/src/apiserver/main.go at 2.17.0: buildHTTPRouter registers /apis/v2beta1/healthz on the top
# router, ahead of the gRPC gateway; its healthzResponse struct, lines 465-470, adds commit_sha and
# tag_name to the two fields the Swagger file declares).
SERVED_BEYOND_SWAGGER = {("GET", f"{API}/healthz"): {"commit_sha": {"type": "string"}, "tag_name": {"type": "string"}}}


def _numbers_for_int64(node: Any) -> Any:
    """What the server accepts for a 64-bit integer: protojson (which grpc-gateway decodes request
    bodies with) takes a decimal string or a JSON number, while it always writes a string
    (https://protobuf.dev/programming-guides/json/, "int64, fixed64, uint64")."""
    if isinstance(node, dict):
        node = {k: _numbers_for_int64(v) for k, v in node.items()}
        if node.get("type") == "string" and node.get("format") in ("int64", "uint64"):
            node["type"] = ["string", "integer"]
        return node
    if isinstance(node, list):
        return [_numbers_for_int64(v) for v in node]
    return node


def _strict(node: Any) -> Any:
    """Every object schema closed to undeclared fields (Swagger leaves them open by default)."""
    if isinstance(node, dict):
        node = {k: _strict(v) for k, v in node.items()}
        if "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


class Api:
    """The vendored definition: operations by method and concrete path, schemas resolvable."""

    def __init__(self) -> None:
        raw = SWAGGER.read_bytes()
        assert hashlib.sha256(raw).hexdigest() == SWAGGER_SHA256, "the vendored file changed: see SOURCE.md"
        self.spec = json.loads(raw)
        self.definitions = _strict(copy.deepcopy(self.spec["definitions"]))
        self.request_definitions = _numbers_for_int64(self.definitions)
        self.routes = [(re.compile(re.sub(r"\{[^}]+\}", r"[^/:]+", path) + "$"), path)
                       for path in sorted(self.spec["paths"], key=lambda p: (p.count("{"), -len(p)))]

    def template(self, method: str, path: str) -> str:
        """The path template of the operation a request reaches (literal paths before templated ones)."""
        for regex, template in self.routes:
            if regex.match(path) and method.lower() in self.spec["paths"][template]:
                return template
        raise AssertionError(f"{method} {path}: no such operation in KFP 2.17's v2beta1 API")

    def operation(self, method: str, path: str) -> dict[str, Any]:
        return self.spec["paths"][self.template(method, path)][method.lower()]

    def validate(self, value: Any, schema: dict[str, Any], where: str, *, request: bool = False) -> None:
        definitions = self.request_definitions if request else self.definitions
        try:
            jsonschema.validate(value, {**_strict(schema), "definitions": definitions})
        except jsonschema.ValidationError as err:
            raise AssertionError(f"{where}: {err.message} at {list(err.absolute_path)}") from None


def check_exchange(api: Api, r: Request) -> None:
    op = api.operation(r.method, r.path)
    where = f"{r.method} {r.path}"
    params = op.get("parameters", [])
    declared = {p["name"] for p in params if p["in"] == "query"}
    assert set(r.query) <= declared, f"{where}: undeclared query parameters {sorted(set(r.query) - declared)}"
    form = {p["name"]: p for p in params if p["in"] == "formData"}
    body = next((p for p in params if p["in"] == "body"), None)
    if form:
        assert isinstance(r.body, dict) and set(r.body) <= set(form), f"{where}: form fields {sorted(r.body)}"
        assert {n for n, p in form.items() if p.get("required")} <= set(r.body), f"{where}: a required form field"
    elif body is not None:
        api.validate(r.body, body["schema"], f"{where} request body", request=True)
    else:
        assert not r.raw, f"{where}: a body the operation does not take"
    schema = op["responses"]["200" if r.status == 200 else "default"].get("schema", {})
    extra = SERVED_BEYOND_SWAGGER.get((r.method, api.template(r.method, r.path))) if r.status == 200 else None
    if extra:
        resolved = api.spec["definitions"][schema["$ref"].rsplit("/", 1)[1]]
        schema = {**resolved, "properties": {**resolved["properties"], **extra}}
    api.validate(r.reply, schema, f"{where} answer {r.status}")


@pytest.fixture
def token(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    value = f"kfp-secret-{secrets.token_hex(12)}"
    monkeypatch.setenv("KFP_TOKEN", value)
    monkeypatch.setattr(kfp.client.client.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp" / "context.json"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    return value


def _submit(server: KfpApiServer, tmp_path: Path, **kw: Any) -> str:
    kw.setdefault("params", REPO / "params.yaml")
    kw.setdefault("poll_interval", 0.01)
    return submit(server.url, platform=PLATFORM, token_file=tmp_path / "no-token-file", **kw)


@pytest.mark.parametrize("multi_user", [False, True])
def test_every_exchange_of_the_submit_flows_matches_kfps_api(token: str, tmp_path: Path, multi_user: bool) -> None:
    api = Api()
    namespace = {"namespace": "team-a"} if multi_user else {}
    changed = tmp_path / "params.yaml"  # a compiled-in change: a new pipeline version
    changed.write_text((REPO / "params.yaml").read_text() + "\n# changed\n")
    with KfpApiServer(token, multi_user=multi_user) as server:
        _submit(server, tmp_path, wait=True, **namespace)  # upload, experiment, run, followed to SUCCEEDED
        _submit(server, tmp_path, arguments=["train_steps=3"], **namespace)  # the same version reused
        _submit(server, tmp_path, params=changed, action="upload", **namespace)  # a new version
        _submit(server, tmp_path, schedule="0 0 3 * * *", action="schedule", **namespace)
        _submit(server, tmp_path, schedule="0 30 4 * * *", action="schedule", **namespace)  # replaced: a DELETE
        exchanges = list(server.requests)
    reached = {(r.method, api.template(r.method, r.path)) for r in exchanges}
    assert {("POST", f"{API}/pipelines/upload"), ("POST", f"{API}/pipelines/upload_version"), ("POST", f"{API}/runs"),
            ("GET", f"{API}/runs/{{run_id}}"), ("POST", f"{API}/recurringruns"),
            ("DELETE", f"{API}/recurringruns/{{recurring_run_id}}"), ("GET", f"{API}/healthz")} <= reached
    for r in exchanges:
        check_exchange(api, r)


def test_the_check_is_not_a_rubber_stamp() -> None:
    """A field the definition does not have, a wrong type, an unknown path: each is caught."""
    api = Api()
    good = Request("GET", f"{API}/healthz", {}, {}, None, b"", 200,
                   {"commit_sha": "x", "tag_name": "2.17.0", "multi_user": False, "pipeline_store": "database"})
    check_exchange(api, good)
    for bad in (Request("GET", f"{API}/healthz", {}, {}, None, b"", 200, {**good.reply, "invented": 1}),
                Request("GET", f"{API}/healthz", {}, {}, None, b"", 200, {**good.reply, "multi_user": "no"}),
                Request("GET", f"{API}/pipelines", {"bogus": "1"}, {}, None, b"", 200, {}),
                Request("GET", f"{API}/nothing", {}, {}, None, b"", 200, {})):
        with pytest.raises(AssertionError):
            check_exchange(api, bad)


def test_healthz_answers_without_credentials_as_the_real_server_does(token: str) -> None:
    """backend/src/apiserver/main.go (2.17.0), buildHTTPRouter: healthz is a plain HTTP handler; the
    other paths go through the authenticated services."""
    import urllib.error
    import urllib.request

    with KfpApiServer(token) as server:
        with urllib.request.urlopen(f"{server.url}{API}/healthz", timeout=10) as answer:
            assert json.loads(answer.read())["multi_user"] is False
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{server.url}{API}/pipelines", timeout=10)
        assert err.value.code == 401
