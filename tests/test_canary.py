"""Secrets and supply chain (issue 14).

Secrets: a recognisable fake key, ``sk-canary-<random hex of this session>``, goes where a user's
key goes — the environment of `dvc repro` and of an OpenAI-judged `spo judge` against a loopback
endpoint (which answers once by quoting the key back, as real endpoints do on a 401), `spo
pipeline compile`, a container step under kfp.local, the chart's values — and every file, log,
metric, report, compiled pipeline, rendered manifest, image layer and cache those paths leave is
scanned for it: raw and base64 / urlsafe-base64 encoded at each of the three byte alignments
(Kubernetes Secrets and HTTP Basic auth carry keys base64-encoded, inside longer strings). Zero
hits, except the one place a key must be: the chart's Secret made from values. A positive control
proves the scanner finds a planted key in each form, so these tests can fail.

Supply chain: `pip check` in the CPU image, its CycloneDX SBOM (`make sbom`) against what the
image holds, and the image running as non-root with every capability dropped.

The Docker parts skip without a daemon or image (SPO_REQUIRE_DOCKER=1: they fail, tests/docker_helpers.py).
"""

import base64
import io
import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest
import yaml
from chart_helpers import example, render
from conftest import REPO
from docker_helpers import docker_client, dockerfiles, project_image, require_docker
from judge_server import JudgeServer, echo_key_401, garbage, rate_limited, server_error, verdict
from kfp.dsl import Artifact, Output
from pipeline_helpers import DVC, _env, read_params, small_project, write_params

KEY = "sk-canary-" + secrets.token_hex(16)  # new every session: no earlier run's file can hold it
KEY_ENV = "SPO_CANARY_JUDGE_KEY"
USER_ENV = {KEY_ENV: KEY, "OPENAI_API_KEY": KEY}  # as exported by a user running the demo
CHUNK = 8 << 20
# The judge's per-request timeout against the loopback endpoints here, which answer in
# milliseconds: only a guard against a hang. A tight one (it was 5 s) turns a slow answer on a
# loaded machine into a retry, and a retry changes the calls and verdicts these tests count.
REQUEST_HANG_GUARD_S = 120.0


# --------------------------------------------------------------------------- the scanner


def key_forms(key: str) -> dict[str, bytes]:
    """The byte strings any encoding of a text containing ``key`` must contain: the key itself, and
    for base64 and urlsafe base64 the characters fixed by the key's bytes alone, at each of the
    three offsets (mod 3) the key can start at inside the encoded text."""
    raw = key.encode()
    forms = {"raw": raw}
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + raw)
        first, last = -(-offset // 3), (offset + len(raw)) // 3  # 4-char groups made of key bytes only
        core = encoded[4 * first:4 * last]
        forms[f"base64@{offset}"] = core
        forms[f"urlsafe-base64@{offset}"] = core.translate(bytes.maketrans(b"+/", b"-_"))  # may equal core
    return forms


@dataclass
class Scanner:
    """Counts what it read and records (where, form) of every occurrence of the key's forms."""

    key: str = KEY
    chunk: int = CHUNK
    n_files: int = 0
    n_bytes: int = 0
    hits: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.forms = key_forms(self.key)
        self.overlap = max(len(f) for f in self.forms.values()) - 1

    def _check(self, where: str, data: bytes, found: set[str]) -> None:
        for form, needle in self.forms.items():
            if form not in found and needle in data:
                found.add(form)
                self.hits.append((where, form))

    def text(self, where: str, data: str | bytes) -> None:
        """One in-memory output (a log, a captured stream, a rendered template)."""
        data = data.encode() if isinstance(data, str) else data
        self.n_files += 1
        self.n_bytes += len(data)
        self._check(where, data, set())

    def stream(self, where: str, f: IO[bytes]) -> None:
        """A file-like object, read in chunks that overlap by one needle length less one byte."""
        found: set[str] = set()
        tail = b""
        self.n_files += 1
        while chunk := f.read(self.chunk):
            self.n_bytes += len(chunk)
            data = tail + chunk
            self._check(where, data, found)
            tail = data[-self.overlap:]

    def path(self, root: Path) -> None:
        """A file, or every regular file under a folder (links not followed); names are scanned too."""
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())
        for p in files:
            self._check(f"{p} (name)", str(p).encode(), set())
            with open(p, "rb") as f:
                self.stream(str(p), f)

    def tar(self, where: str, f: IO[bytes], depth: int = 0) -> None:
        """A tar stream (a `docker save`): every member's name and content; its members that are tars
        themselves (image layers, plain or gzipped) are opened and scanned member by member, not as
        raw bytes; a layer's own archives (a library's .gz data) are scanned as they are."""
        with tarfile.open(fileobj=f, mode="r|*") as archive:
            for member in archive:
                name = f"{where}!{member.name}"
                self._check(f"{name} (name)", (member.name + " " + member.linkname).encode(), set())
                if not member.isfile():
                    continue
                body = archive.extractfile(member)
                assert body is not None
                head = body.read(512)
                rest = _Chain(head, body)
                if depth == 0 and (head[257:262] == b"ustar" or head[:2] == b"\x1f\x8b"):  # a layer
                    self.tar(name, io.BufferedReader(rest, CHUNK), depth + 1)
                else:
                    self.stream(name, io.BufferedReader(rest, CHUNK))

    def summary(self) -> str:
        return (f"{self.n_files} files, {self.n_bytes} bytes ({self.n_bytes / 1e6:.1f} MB) scanned, "
                f"{len(self.hits)} hits")


class _Chain(io.RawIOBase):
    """Bytes already read, then the rest of a stream (so the head of a member can be peeked at)."""

    def __init__(self, head: bytes, rest: IO[bytes] | Iterator[bytes]) -> None:
        self._buf = head
        self._rest = rest

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if not self._buf:
            if hasattr(self._rest, "read"):
                self._buf = self._rest.read(len(b))
            else:
                self._buf = next(self._rest, b"")
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


@pytest.fixture(scope="module")
def totals(request: pytest.FixtureRequest) -> Iterator[list[tuple[str, Scanner, float]]]:
    """Every part's scan, summed up on the terminal when the module ends."""
    parts: list[tuple[str, Scanner, float]] = []
    yield parts
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    lines = [f"canary {name}: {scan.summary()} in {seconds:.1f} s" for name, scan, seconds in parts]
    files, size = sum(s.n_files for _, s, _ in parts), sum(s.n_bytes for _, s, _ in parts)
    lines.append(f"canary total: {files} files, {size} bytes ({size / 1e6:.1f} MB), "
                 f"{sum(len(s.hits) for _, s, _ in parts)} hits")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        for line in lines:
            if reporter is not None:
                reporter.write_line(line)
            else:
                print(line)


def _finish(totals: list, name: str, scan: Scanner, started: float) -> None:
    totals.append((name, scan, time.perf_counter() - started))
    print(f"canary {name}: {scan.summary()}")
    assert scan.n_files > 0 and scan.n_bytes > 0
    assert scan.hits == [], f"the canary key leaked ({name}): {scan.hits[:20]}"


# --------------------------------------------------------------------------- positive control


def test_the_scanner_finds_the_key_raw_and_base64_encoded_anywhere(tmp_path: Path) -> None:
    """Planted in files, inside longer strings at every alignment, across a chunk boundary and
    inside a tar inside a tar: found each time; a clean tree gives no hit."""
    planted = {
        "header.txt": f"Authorization: Bearer {KEY}\n".encode(),
        "secret.yaml": f"data:\n  api-key: {base64.b64encode(KEY.encode()).decode()}\n".encode(),
        "basic.txt": b"Authorization: Basic " + base64.b64encode(f"user:{KEY}".encode()),
        "url.txt": base64.urlsafe_b64encode(b"\xfb\xff" + KEY.encode() + b"\xfe"),
        "boundary.bin": b"x" * 61 + KEY.encode() + b"y" * 10,  # straddles the 64-byte chunks below
    }
    for name, data in planted.items():
        (tmp_path / "dirty" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "dirty" / name).write_bytes(data)
    clean = tmp_path / "clean"
    clean.mkdir()
    (clean / "a.txt").write_text("sk-canary-" + "0" * 32 + " " + base64.b64encode(b"sk-canary-").decode())

    scan = Scanner(chunk=64)
    scan.path(tmp_path / "dirty")
    hit_files = {Path(where).name for where, _ in scan.hits}
    assert hit_files == set(planted), scan.hits
    forms = {form.split("@")[0] for _, form in scan.hits}
    assert forms == {"raw", "base64", "urlsafe-base64"}, scan.hits

    # every alignment of base64 and urlsafe base64
    for offset in range(3):
        for encode, form in ((base64.b64encode, "base64"), (base64.urlsafe_b64encode, "urlsafe-base64")):
            one = Scanner(chunk=64)
            one.text("t", encode(b"\xfb" * offset + KEY.encode() + b"!"))
            assert f"{form}@{offset}" in {f for _, f in one.hits}, (offset, form, one.hits)

    # a tar (an image) holding a tar (a layer) holding the key in one member
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w") as t:
        for name, data in (("etc/ok", b"nothing"), ("opt/app/config.json", json.dumps({"k": KEY}).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    outer = io.BytesIO()
    with tarfile.open(fileobj=outer, mode="w") as t:
        info = tarfile.TarInfo("abc/layer.tar")
        info.size = len(inner.getvalue())
        t.addfile(info, io.BytesIO(inner.getvalue()))
    outer.seek(0)
    nested = Scanner()
    nested.tar("image.tar", outer)
    assert nested.hits == [("image.tar!abc/layer.tar!opt/app/config.json", "raw")], nested.hits
    assert nested.n_files == 2  # the layer's two files, not the layer as a blob

    quiet = Scanner(chunk=64)
    quiet.path(clean)
    assert quiet.hits == [] and quiet.n_files == 1


# --------------------------------------------------------------------------- the demo path


def _run(cmd: list[str], cwd: Path, env: dict[str, str], scan: Scanner, label: str, ok: bool = True) -> int:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    scan.text(f"{label} (stdout)", result.stdout)
    scan.text(f"{label} (stderr)", result.stderr)
    if ok:
        assert result.returncode == 0, f"{label}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result.returncode


@pytest.mark.slow
def test_the_demo_path_with_the_openai_judge_leaves_no_key(tmp_path: Path, hh_slice: Path, totals: list) -> None:
    """`dvc repro` of the data stages and `spo judge` (backend openai, loopback endpoint, the key in
    the environment), once failing on a 401 that quotes the key, once through 429/500/garbage to
    success; then `spo report` and `spo results`. Every file of the project copy (.dvc/cache, dvc's
    site cache, .git included), every captured stream and every request body: no key."""
    started = time.perf_counter()
    scan = Scanner()
    work = small_project(tmp_path)
    env = {**_env(hh_slice), **USER_ENV}
    _run([*DVC, "repro", "degrees"], work, env, scan, "dvc repro degrees")  # prepare validate keywords degrees

    rows = [json.loads(line) for line in (work / "data/validated/test.jsonl").read_text().splitlines()[:4]]
    assert len(rows) == 4
    generations = work / "outputs/generations"
    generations.mkdir(parents=True)
    (generations / "dpo_spo_s0.jsonl").write_text("".join(
        json.dumps({"id": r["id"], "prompt": r["prompt"], "response": " a longer, careful answer", "sample": 0,
                    "model": "dpo_spo_s0"}) + "\n" for r in rows))
    server = JudgeServer().start()
    try:
        params = read_params(work)
        params["judge"].update(backend="openai", auto_comparisons=False,
                               comparisons=[{"name": "dpo_spo_s0_vs_chosen", "a": "dpo_spo_s0", "b": "chosen"}])
        params["judge"]["openai"].update(base_url=server.base_url, model="judge-canary", api_key_env=KEY_ENV,
                                         concurrency=2)
        params["judge"]["openai"]["retry"].update(max_retries=3, initial_backoff=0.01, max_backoff=0.05,
                                                  timeout=REQUEST_HANG_GUARD_S)
        write_params(work, params)

        server.default = echo_key_401  # a bad-key answer that quotes the key back
        rc = _run([sys.executable, "-m", "spo", "judge"], work, env, scan, "spo judge (401)", ok=False)
        assert rc != 0 and server.calls >= 1
        server.default = lambda rec: verdict("A")
        server.push(rate_limited(0.01), server_error(), garbage())
        _run([sys.executable, "-m", "spo", "judge", "--json"], work, env, scan, "spo judge")
        _run([sys.executable, "-m", "spo", "report"], work, env, scan, "spo report")
        _run([sys.executable, "-m", "spo", "results"], work, env, scan, "spo results")
    finally:
        server.stop()

    assert json.loads((work / "metrics/judge.json").read_text())["dpo_spo_s0_vs_chosen"]["n"] == 4
    # the key did travel — as the Authorization header, and nowhere else in any request
    assert server.requests and all(r.headers["authorization"] == f"Bearer {KEY}" for r in server.requests)
    for i, r in enumerate(server.requests):
        scan.text(f"request {i} (headers but authorization)",
                  json.dumps({k: v for k, v in r.headers.items() if k != "authorization"}))
        scan.text(f"request {i} (body)", r.raw_body)
    assert (work / ".dvc/cache").is_dir() and (work / "outputs/judge_cache.sqlite").is_file()
    scan.path(work)
    from dvc.repo import Repo

    with Repo(str(work)) as repo:
        site = Path(repo.site_cache_dir)
    if site.is_dir():
        scan.path(site)
    _finish(totals, "demo path (dvc repro + spo judge/report/results)", scan, started)


# --------------------------------------------------------------------------- pipeline compile


@pytest.mark.slow
def test_the_compiled_pipeline_names_the_key_secret_but_holds_no_key(
        tmp_path: Path, totals: list, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """`spo pipeline compile` (and its Pipeline/PipelineVersion form) with backend openai, the GPU
    platform's judge Secret and the key in the compiler's environment: the judge step reads the
    key's variable from the Secret (secretKeyRef), and no file or log holds the key."""
    started = time.perf_counter()
    scan = Scanner()
    params = tmp_path / "params.yaml"
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["judge"]["backend"] = "openai"
    data["judge"]["openai"]["api_key_env"] = KEY_ENV
    params.write_text(yaml.safe_dump(data, sort_keys=False))
    platform_file, image = REPO / "configs/platform/gpu.yaml", "registry.example.com/spo:cuda-canary"
    outs = [tmp_path / "pipeline.yaml", tmp_path / "manifests.yaml"]
    _run([sys.executable, "-m", "spo", "pipeline", "compile", "-p", str(params), "--platform", str(platform_file),
          "--image", image, "-o", str(outs[0])], REPO, {**os.environ, **USER_ENV}, scan, "spo pipeline compile")
    # the Pipeline/PipelineVersion form, by the library function, its log captured
    from spo.pipelines.compile import compile_pipeline

    for name, value in USER_ENV.items():
        monkeypatch.setenv(name, value)
    caplog.set_level(logging.DEBUG)
    compile_pipeline(outs[1], params=params, platform=platform_file, image=image, kubernetes_manifests=True,
                     namespace="ml")
    scan.text("compile_pipeline log", caplog.text)
    assert outs[1].stat().st_size > 0
    compiled = outs[0].read_text()
    judge = yaml.safe_load_all(compiled)
    platform = [d for d in judge if d and "platforms" in d][0]
    executor = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-judge"]
    refs = executor["secretAsEnv"]
    assert any(ref["secretName"] == "spo-judge" and {"secretKey": "api-key", "envVar": KEY_ENV} in ref["keyToEnv"]
               for ref in refs), refs
    scan.path(tmp_path)
    _finish(totals, "pipeline compile", scan, started)


# --------------------------------------------------------------------------- kfp.local, in the image


def canary_judge_step(report: Output[Artifact]) -> None:
    """A step in the project image with the key in its environment: the in-image OpenAI judge calls
    an endpoint (in the container, loopback only: no network) that fails once with a 500, then
    quotes the key back in a 401; everything it says is logged and kept as the step's output."""
    import json
    import logging
    import os
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    logging.basicConfig(level=logging.DEBUG)
    calls = []

    class Echo(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length") or 0))
            calls.append(self.path)
            key = self.headers.get("authorization", "").removeprefix("Bearer ")
            status = 500 if len(calls) == 1 else 401
            body = json.dumps({"error": {"message": f"Incorrect API key provided: {key}",
                                         "type": "invalid_request_error"}}).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    from spo.config import OpenAIJudgeConfig, RetryConfig
    from spo.errors import JudgeAPIError
    from spo.judging.base import JudgeRequest
    from spo.judging.cache import JudgeCache
    from spo.judging.openai_judge import OpenAIJudge

    os.makedirs(report.path, exist_ok=True)
    cfg = OpenAIJudgeConfig(base_url=f"http://127.0.0.1:{server.server_port}/v1", model="judge-canary",
                            api_key_env="SPO_CANARY_JUDGE_KEY",
                            retry=RetryConfig(max_retries=2, initial_backoff=0.01, max_backoff=0.05,
                                              timeout=120.0))  # a hang guard: see REQUEST_HANG_GUARD_S
    judge = OpenAIJudge(cfg, "v1", JudgeCache(os.path.join(report.path, "judge_cache.sqlite")))
    try:
        judge.judge_many([JudgeRequest("\n\nHuman: hi?\n\nAssistant:", " a", " b", "dialogue")], progress=True)
        error = "no error"
    except JudgeAPIError as err:
        error = f"{err} | {err!r} | {judge!r}"
    judge.cache.close()
    logging.getLogger("canary").error("the judge failed: %s", error)
    status = dict(line.split(":\t", 1) for line in open("/proc/self/status").read().splitlines() if ":\t" in line)
    result = {"error": error, "calls": len(calls), "uid": os.getuid(),
              "key_set": bool(os.environ.get("SPO_CANARY_JUDGE_KEY")),
              "CapEff": status.get("CapEff", "").strip(), "CapBnd": status.get("CapBnd", "").strip(),
              "NoNewPrivs": status.get("NoNewPrivs", "").strip()}
    print(json.dumps(result))
    with open(os.path.join(report.path, "result.json"), "w") as f:
        json.dump(result, f)


@pytest.mark.slow
def test_a_kfp_local_container_step_with_the_key_leaves_no_key(tmp_path: Path, totals: list,
                                                               capfd: pytest.CaptureFixture[str]) -> None:
    """kfp.local's DockerRunner as `spo pipeline run-local` sets it up (no network, the image's user),
    with the key added to the container's environment; the step's output, kfp.local's pipeline root
    and workspace, the container's logs and this daemon's log: no key."""
    require_docker()
    image = project_image()
    started = time.perf_counter()
    from kfp import dsl, local

    from spo.pipelines.local import _exit_codes_checked, _runner

    root, workspace = tmp_path / "root", tmp_path / "workspace"
    root.mkdir()
    workspace.mkdir()
    runner = _runner("docker", root, workspace)
    runner.container_run_args["environment"].update(USER_ENV)
    local.init(runner=runner, pipeline_root=str(root), workspace_root=str(workspace), raise_on_error=True)
    step = dsl.component(base_image=image, install_kfp_package=False)(canary_judge_step)
    with _exit_codes_checked({}):
        task = step()
    out = Path(task.outputs["report"].path)
    result = json.loads((out / "result.json").read_text())
    assert result["key_set"] and result["calls"] == 2 and result["uid"] != 0, result
    assert "401" in result["error"] and "***" in result["error"], result  # failed on the echoed key, masked
    # the runner drops every capability, the bounding set included, and forbids privilege escalation
    assert (result["CapEff"], result["CapBnd"], result["NoNewPrivs"]) == ("0" * 16, "0" * 16, "1"), result
    captured = capfd.readouterr()
    scan = Scanner()
    scan.text("kfp.local stdout (container logs)", captured.out)
    scan.text("kfp.local stderr", captured.err)
    scan.path(root)
    scan.path(workspace)
    daemon_log = REPO / "build" / "docker" / "dockerd.log"
    if daemon_log.is_file():
        scan.path(daemon_log)
    print(f"kfp.local step: uid {result['uid']}, CapEff {result['CapEff']}, NoNewPrivs {result['NoNewPrivs']}")
    _finish(totals, "kfp.local container step", scan, started)


# --------------------------------------------------------------------------- the chart


def test_the_rendered_chart_holds_the_key_only_in_its_own_secret(totals: list) -> None:
    """The key where a user sets one in values — the DVC remote's secretAccessKey with create: true
    (the judge's key is only ever an existing Secret's name: the schema has no field for a key) —
    is in the chart's Secret, base64-encoded, and in no other rendered template or NOTES.txt."""
    started = time.perf_counter()
    values = example("gpu-pools")
    values.setdefault("judge", {}).update(backend="openai", apiKey={"existingSecret": "spo-judge", "key": "api-key"})
    values["dvcRemote"] = {**values.get("dvcRemote", {}), "enabled": True, "url": "s3://bucket/spo",
                           "credentials": {"existingSecret": "", "create": True, "accessKeyId": "AKIACANARYEXAMPLE",
                                           "secretAccessKey": KEY}}
    rendered = render(values)
    scan = Scanner()
    for name, text in sorted(rendered.items()):
        scan.text(name, text)
    secret_files = {where for where, _ in scan.hits}
    assert len(secret_files) == 1 and next(iter(secret_files)).endswith("templates/secret.yaml"), scan.hits
    secret = yaml.safe_load(rendered[next(iter(secret_files))])
    assert secret["kind"] == "Secret" and base64.b64decode(secret["data"]["AWS_SECRET_ACCESS_KEY"]).decode() == KEY
    assert "raw" not in {form for _, form in scan.hits}, scan.hits  # never in clear, even there
    scan.hits = [(w, f) for w, f in scan.hits if w not in secret_files]
    # nowhere to put the judge's key: a value for it fails the schema
    with pytest.raises(Exception, match="apiKey"):
        render({**values, "judge": {**values["judge"], "apiKey": {"existingSecret": "spo-judge", "value": KEY}}})
    _finish(totals, "chart render (all templates but the Secret)", scan, started)


# --------------------------------------------------------------------------- the image


@pytest.mark.slow
def test_the_image_layers_hold_no_key(totals: list) -> None:
    """`docker save` of the CPU image, streamed: every file of every layer, the config and manifest."""
    image = project_image()
    started = time.perf_counter()
    scan = Scanner()
    chunks = docker_client().images.get(image).save(chunk_size=CHUNK)
    scan.tar(f"docker save {image}", io.BufferedReader(_Chain(b"", iter(chunks)), CHUNK))
    assert scan.n_files > 10000, scan.summary()  # the layers were opened, not scanned as blobs
    _finish(totals, "image layers (docker save)", scan, started)


@pytest.fixture(scope="module")
def image_facts() -> dict[str, Any]:
    """One throwaway container of the CPU image as a restricted pod runs it: no network, every
    capability dropped, no-new-privileges, read-only root, /tmp a tmpfs, the image's own user —
    its uid, capability sets, `pip check` and every installed distribution's version."""
    image = project_image()
    script = (
        "import importlib.metadata as m, json, os, subprocess, sys\n"
        "check = subprocess.run([sys.executable, '-m', 'pip', 'check', '--disable-pip-version-check'],"
        " capture_output=True, text=True)\n"
        "status = dict(l.split(':\\t', 1) for l in open('/proc/self/status').read().splitlines() if ':\\t' in l)\n"
        "print(json.dumps({'uid': os.getuid(), 'gid': os.getgid(),"
        " 'pip_check': [check.returncode, check.stdout + check.stderr],"
        " 'caps': {k: v.strip() for k, v in status.items() if k.startswith('Cap') or k == 'NoNewPrivs'},"
        " 'dists': {d.metadata['Name']: d.version for d in m.distributions()}}))\n")
    client = docker_client()
    container = client.containers.run(image, ["python3", "-c", script], detach=True, network_mode="none",
                                      cap_drop=["ALL"], security_opt=["no-new-privileges"], read_only=True,
                                      tmpfs={"/tmp": "rw,size=64m"})
    try:
        status = container.wait(timeout=300)["StatusCode"]  # a hang guard: the script takes seconds
        out = container.logs(stdout=True, stderr=False).decode()
        err = container.logs(stdout=False, stderr=True).decode()
    finally:
        container.remove(force=True)
    assert status == 0, err[-3000:]
    return {"image": image, **json.loads(out)}


@pytest.mark.slow
def test_pip_check_passes_in_the_image(image_facts: dict[str, Any]) -> None:
    rc, output = image_facts["pip_check"]
    assert rc == 0 and output.strip() == "No broken requirements found.", output


@pytest.mark.slow
def test_the_image_runs_as_non_root_with_every_capability_dropped(image_facts: dict[str, Any]) -> None:
    """What the chart asks of a pod (runAsNonRoot, capabilities drop ALL, allowPrivilegeEscalation
    false, readOnlyRootFilesystem) is all the image needs; and the last USER of each Dockerfile is
    the numeric non-root one, so nothing after it runs as root."""
    assert image_facts["uid"] == 1000 and image_facts["gid"] == 1000, image_facts
    caps = image_facts["caps"]
    assert caps["CapEff"] == caps["CapPrm"] == caps["CapBnd"] == "0000000000000000", caps
    assert caps["NoNewPrivs"] == "1", caps
    for dockerfile in dockerfiles():
        users = [line.split()[1] for line in dockerfile.read_text().splitlines() if line.startswith("USER ")]
        assert users == ["1000:1000"], (dockerfile.name, users)


@pytest.mark.slow
def test_make_sbom_lists_what_the_image_holds(tmp_path: Path, image_facts: dict[str, Any]) -> None:
    """`make sbom`: valid CycloneDX 1.6 JSON whose root is spo-pipeline and whose components are
    exactly the image's other installed distributions at their versions (torch 2.13.0+cpu,
    transformers, ... as the image reports them)."""
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    if shutil.which("docker") is None or shutil.which("make") is None:
        message = "`make sbom` needs the docker CLI and make"
        if os.environ.get("SPO_REQUIRE_DOCKER") == "1":
            pytest.fail(f"SPO_REQUIRE_DOCKER=1 but {message}")
        pytest.skip(message)
    out = tmp_path / "spo-cpu.cdx.json"
    venv = Path(sys.prefix)
    result = subprocess.run(["make", "-s", "-o", f"{venv}/bin/.installed", "sbom", f"VENV={venv}", f"SBOM={out}",
                             f"SBOM_IMAGE={image_facts['image']}",
                             "CYCLONEDX_VALIDATE=--no-validate"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    text = out.read_text()
    errors = JsonStrictValidator(SchemaVersion.V1_6).validate_str(text)
    assert errors is None, errors
    bom = json.loads(text)
    assert bom["bomFormat"] == "CycloneDX" and bom["specVersion"] == "1.6"
    root = bom["metadata"]["component"]
    listed = {c["name"].lower(): c["version"] for c in bom["components"]}
    listed[root["name"].lower()] = root["version"]
    dists = {name.lower(): version for name, version in image_facts["dists"].items()}
    for name in ("torch", "transformers", "spo-pipeline"):
        assert listed[name] == dists[name], (name, listed.get(name), dists.get(name))
    assert dists["torch"] == "2.13.0+cpu"
    assert listed == dists
    print(f"sbom: {len(bom['components'])} components + root {root['name']} {root['version']} "
          f"({len(dists)} distributions in {image_facts['image']})")


def test_constraints_pin_every_wheel_of_the_image() -> None:
    """The wheelhouse the images are built from (docker/wheelhouse.sh) holds only pinned versions:
    every wheel but the project's is a constraints.txt pin (torch with its local +cpu tag)."""
    wheelhouse = REPO / "build" / "wheelhouse" / "cpu"
    if not wheelhouse.is_dir():
        pytest.skip("no CPU wheelhouse: run `make wheelhouse`")

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    pins = dict(line.strip().split("==") for line in (REPO / "constraints.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#"))
    pins = {norm(name): version for name, version in pins.items()}
    unpinned = []
    for wheel in sorted(wheelhouse.glob("*.whl")):
        name, version = wheel.name.split("-")[:2]
        if norm(name) == "spo-pipeline":
            continue
        if pins.get(norm(name)) not in (version, version.split("+")[0]):
            unpinned.append(f"{wheel.name} (constraints: {pins.get(norm(name))})")
    assert unpinned == [], unpinned

