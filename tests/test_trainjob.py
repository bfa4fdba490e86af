"""Multi-node training: the platform's TrainJob settings, the TrainJob built from them (validated
strictly against the vendored Kubeflow Trainer CRD), the launcher driven with the real
``kubernetes`` client against a loopback API server (tests/k8s_api_server.py), the launcher
task's step, and the compiled pipelines with and without it."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import shutil
import signal
import socket
import tomllib
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO
from fake_clock import FakeClock
from k8s_api_server import Fault, TrainJobApi, complete, failed, running
from kubernetes import client as k8s

from spo.cluster import launcher as launcher_module
from spo.cluster.launcher import Terminated, launch
from spo.cluster.trainjob import WorkspaceMount, build_trainjob, render_trainjob, validate_trainjob
from spo.config import load_config
from spo.errors import (
    InputError,
    ManifestValidationError,
    TrainJobApiError,
    TrainJobError,
    TrainJobFailed,
    TrainJobTimeout,
)
from spo.kube.manifests import load_crd_schemas, strict_json_schema
from spo.kube.platform import Platform, load_platform
from spo.pipelines.train_job import run_train_job, trainjob_name, workspace_claim

PLATFORMS = REPO / "configs" / "platform"
TRAINJOB = ("trainer.kubeflow.org", "v1alpha1", "TrainJob")
POLL = 0.05
NS = "team-a"


def multinode() -> Platform:
    return load_platform(PLATFORMS / "multinode.yaml")


def a_job(platform: Platform | None = None) -> dict[str, Any]:
    return build_trainjob(platform or multinode(), name="spo-dpo-1234abcd-0a0b",
                          params_file="/kfp-workspace/trainjobs/x/params.yaml",
                          overrides=['train.out_dir="/kfp-workspace/models/policy/dpo"'],
                          workspace=WorkspaceMount(claim="run-abc-kfp-workspace"), labels={"pipeline/runid": "1234"})


# --------------------------------------------------------------------------- the vendored CRD


def crd_folder() -> Any:
    return resources.files("spo.kube").joinpath("crds", "trainer")


def test_vendored_crd_matches_its_source_record() -> None:
    meta = json.loads(crd_folder().joinpath("SOURCE.json").read_text(encoding="utf-8"))
    assert meta["repository"] == "https://github.com/kubeflow/trainer"
    assert meta["tag"] == "v2.3.0" and len(meta["commit"]) == 40
    on_disk = {item.name for item in crd_folder().iterdir() if item.name.endswith(".yaml")}
    assert {entry["file"] for entry in meta["files"]} == on_disk
    for entry in meta["files"]:
        data = crd_folder().joinpath(entry["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], entry["file"]
        assert hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() == entry["git_blob"], entry["file"]
        assert entry["source_path"].endswith(entry["file"])
    spec = load_crd_schemas("trainer")[TRAINJOB]["properties"]["spec"]["properties"]
    assert {"runtimePatches", "activeDeadlineSeconds"} <= set(spec)  # what the pin was chosen for


def test_crd_files_are_package_data() -> None:
    """A wheel ships only what package-data matches; without the CRD the launcher cannot validate."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = pyproject["tool"]["setuptools"]["package-data"]["spo"]
    for item in crd_folder().iterdir():
        relative = f"kube/crds/trainer/{item.name}"
        assert any(fnmatch.fnmatch(relative, pattern) for pattern in patterns), relative


def test_the_crds_cel_rules_are_enforced_and_transition_rules_skipped() -> None:
    job = a_job()
    job["metadata"]["name"] = "spo.dpo"  # a DNS subdomain, but TrainJob wants an RFC 1035 label
    job["spec"]["managedBy"] = "someone-else"
    job["spec"]["initializer"] = {"model": {"storageUri": "not a uri"}}
    with pytest.raises(ManifestValidationError) as caught:
        validate_trainjob(job)
    found = {p.path: p.message for p in caught.value.problems}
    assert "RFC 1035" in found["$.metadata.name"]  # the CRD's own message comes with the finding
    assert "ManagedBy must be" in found["$.spec.managedBy"]
    assert "storageUri" in found["$.spec.initializer.model.storageUri"]
    ok = a_job()
    ok["spec"]["initializer"] = {"model": {"storageUri": ""}}  # '' or a URI
    validate_trainjob(ok)  # the immutability rules (self == oldSelf) apply to updates, not to this create


def test_cel_rules_it_cannot_translate_are_refused() -> None:
    with pytest.raises(ValueError, match="x-kubernetes-validations rule 'self.a > 0'"):
        strict_json_schema({"type": "object", "x-kubernetes-validations": [{"rule": "self.a > 0"}]})


# --------------------------------------------------------------------------- the platform file


def test_single_pod_platforms_keep_their_behaviour() -> None:
    for name in ("local", "gpu"):
        platform = load_platform(PLATFORMS / f"{name}.yaml")
        assert not platform.train_job
        assert all(p.nodes == 1 and p.processes_per_node is None and not p.env and not p.secret_env
                   for p in platform.pools.values())
    four = Platform.model_validate({"image": "x",
                                    "pools": {"cpu": {"accelerator": {"type": "nvidia.com/gpu", "count": 4}}}})
    assert not four.train_job  # an unset processes_per_node never turns a single pod into a TrainJob
    assert four.pools["cpu"].procs_per_node == 4  # ... but a TrainJob on the pool would run one per GPU


def test_multinode_platform_asks_for_a_trainjob() -> None:
    platform = multinode()
    train = platform.pool("train")
    assert platform.train_job and train.nodes == 2 and train.procs_per_node == 8
    assert train.active_deadline == 24 * 3600 and train.trainer_runtime == "torch-distributed"
    assert platform.launcher().accelerator is None


@pytest.mark.parametrize(("value", "seconds"),
                         [("90m", 5400), ("1h30m", 5400), ("45s", 45), ("3600", 3600), (120, 120)])
def test_active_deadline_takes_durations(value: Any, seconds: int) -> None:
    pool = Platform.model_validate({"image": "x", "pools": {"cpu": {"active_deadline": value}}}).pools["cpu"]
    assert pool.active_deadline == seconds


def _refusal(tmp_path: Path, change: dict[str, Any]) -> str:
    data = yaml.safe_load((PLATFORMS / "multinode.yaml").read_text())
    for dotted, value in change.items():
        *parents, last = dotted.split(".")
        node = data
        for part in parents:
            node = node[part]
        node[last] = value
    path = tmp_path / "platform.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(InputError) as caught:
        load_platform(path)
    return str(caught.value)


def test_platforms_a_trainjob_cannot_honour_are_refused(tmp_path: Path) -> None:
    # with no checkpoint volume the TrainJob's pods share the run's workspace, which must then be ReadWriteMany
    rwo = {"workspace.access_modes": ["ReadWriteOnce"], "checkpoints": None}
    assert "needs ReadWriteMany" in _refusal(tmp_path, rwo)
    # one node but 8 processes is a TrainJob too: its pod and the launcher's still mount the volume at once
    one_node = _refusal(tmp_path, {**rwo, "pools.gpu-multinode.nodes": 1})
    assert "1 node(s) x 8 process(es)" in one_node
    shared = _refusal(tmp_path, {"steps.sft": "gpu-multinode"})
    assert "pools.gpu-multinode" in shared and "['sft']" in shared
    assert "launcher_pool" in _refusal(tmp_path, {"launcher_pool": "gpu"})
    assert "PET_MASTER_ADDR" in _refusal(tmp_path, {"pools.gpu-multinode.env": {"PET_MASTER_ADDR": "x"}})
    assert "not a duration" in _refusal(tmp_path, {"pools.gpu-multinode.active_deadline": "tomorrow"})
    assert "nodes" in _refusal(tmp_path, {"pools.gpu-multinode.nodes": 0})


# --------------------------------------------------------------------------- the TrainJob


def test_trainjob_runs_the_train_stage_under_torchrun_on_the_train_pool() -> None:
    data = yaml.safe_load((PLATFORMS / "multinode.yaml").read_text())
    data["image_pull_secrets"] = ["regcred"]
    data["pools"]["gpu-multinode"]["secret_env"] = {"HF_TOKEN": {"name": "hf", "key": "token"}}
    job = a_job(Platform.model_validate(data))
    validate_trainjob(job)  # strict: every field known to the pinned CRD
    spec = job["spec"]
    assert spec["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                  "name": "torch-distributed"}
    trainer = spec["trainer"]
    # torch-distributed only sets PET_*: the command itself must be torchrun, running `spo train`
    assert trainer["command"] == ["torchrun", "--module", "spo", "train"]
    assert trainer["args"] == ["-p", "/kfp-workspace/trainjobs/x/params.yaml",
                               "-S", 'train.out_dir="/kfp-workspace/models/policy/dpo"']
    assert trainer["image"] == "registry.example.com/spo-pipeline:0.1.0-cuda"
    assert trainer["numNodes"] == 2 and trainer["numProcPerNode"] == 8
    assert trainer["resourcesPerNode"] == {"requests": {"cpu": "64", "memory": "512Gi"},
                                           "limits": {"cpu": "96", "memory": "900Gi", "nvidia.com/gpu": "8"}}
    env = {e["name"]: e for e in trainer["env"]}
    assert env["HF_TOKEN"] == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}
    assert env["NCCL_DEBUG"]["value"] == "WARN" and not any(n.startswith("PET_") for n in env)
    # every trainer process checks it can use the node's 8 GPUs before any work (spo.accelerator)
    assert env["SPO_PLACED_GPUS"] == {"name": "SPO_PLACED_GPUS", "value": "8"}
    assert spec["activeDeadlineSeconds"] == 86400
    template = spec["runtimePatches"][0]["trainingRuntimeSpec"]["template"]
    node = template["spec"]["replicatedJobs"][0]
    # the trainer pods (only they) opt out of Istio's sidecar: under a profile namespace's deny-all it
    # would sit between torchrun's ranks (istio/istio pkg/kube/inject/inject.go at 00af2c5, injectRequired)
    assert node["name"] == "node"
    pod = node["template"]["spec"]["template"]
    assert pod["metadata"]["labels"]["sidecar.istio.io/inject"] == "false"
    assert "sidecar.istio.io/inject" not in node["template"]["metadata"]["labels"]
    assert pod["metadata"]["labels"]["pipeline/runid"] == "1234"  # kubectl get pods -l pipeline/runid=...
    assert job["metadata"]["labels"]["app.kubernetes.io/name"] == "spo-pipeline"
    pod_spec = pod["spec"]
    assert ({"name": "kfp-workspace", "persistentVolumeClaim": {"claimName": "run-abc-kfp-workspace"}}
            in pod_spec["volumes"])
    assert pod_spec["containers"] == [{"name": "node", "volumeMounts": [
        {"name": "kfp-workspace", "mountPath": "/kfp-workspace"}, {"name": "dshm", "mountPath": "/dev/shm"}],
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}]
    # the restricted Pod Security Standard, as the chart's own pods: the image's non-root user
    assert pod_spec["securityContext"] == {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000,
                                           "fsGroup": 1000, "seccompProfile": {"type": "RuntimeDefault"}}
    assert pod_spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod_spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod_spec["imagePullSecrets"] == [{"name": "regcred"}]


def test_the_train_pools_node_affinity_reaches_the_trainer_pods() -> None:
    data = yaml.safe_load((PLATFORMS / "multinode.yaml").read_text())
    data["pools"]["gpu-multinode"]["node_affinity"] = [
        {"match_expressions": [{"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["a", "b"]}]},
        {"match_expressions": [{"key": "nvidia.com/gpu.product", "operator": "Exists"}], "weight": 30}]
    job = a_job(Platform.model_validate(data))
    validate_trainjob(job)
    pod = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    affinity = pod["template"]["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]
    assert affinity == {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [
            {"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["a", "b"]}]}]},
        "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 30, "preference": {"matchExpressions": [
            {"key": "nvidia.com/gpu.product", "operator": "Exists"}]}}]}


def test_an_unknown_field_in_a_trainjob_is_refused_naming_it() -> None:
    job = a_job()
    job["spec"]["trainer"]["numNode"] = 2  # typo: the API server would prune it and train on one node
    pod_spec = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    pod_spec["template"]["spec"]["template"]["spec"]["containers"][0]["resources"] = {}  # not patchable
    with pytest.raises(ManifestValidationError) as caught:
        validate_trainjob(job)
    paths = {p.path for p in caught.value.problems}
    assert "$.spec.trainer.numNode" in paths
    assert any(p.endswith("containers[0].resources") for p in paths)


def test_render_checks_the_params_and_that_every_path_is_on_the_volume(tmp_path: Path) -> None:
    on_volume = [f"train.{key}=/kfp-workspace/{key}" for key in ("rows_dir", "degrees_dir", "sft_dir", "out_dir")]
    on_volume.append("train.metrics_file=/kfp-workspace/metrics.json")
    text = render_trainjob(str(REPO / "params.yaml"), str(PLATFORMS / "multinode.yaml"), name="spo-try-1",
                           workspace_claim="shared", namespace=NS, overrides=on_volume,
                           params_in_pod="/kfp-workspace/params.yaml", image="registry.example.com/spo:dev")
    job = yaml.safe_load(text)
    validate_trainjob(job)
    assert job["metadata"] == {"name": "spo-try-1", "labels": job["metadata"]["labels"], "namespace": NS}
    assert job["spec"]["trainer"]["image"] == "registry.example.com/spo:dev"
    assert job["spec"]["trainer"]["args"][:2] == ["-p", "/kfp-workspace/params.yaml"]
    with pytest.raises(InputError) as caught:
        render_trainjob(str(REPO / "params.yaml"), str(PLATFORMS / "multinode.yaml"), name="spo-try-1",
                        workspace_claim="shared", overrides=on_volume[1:])
    assert "train.rows_dir = 'data/validated'" in str(caught.value) and "params file" in str(caught.value)
    with pytest.raises(InputError, match=r"(?s)would reject this TrainJob.*\$\.metadata\.name"):
        render_trainjob(str(REPO / "params.yaml"), str(PLATFORMS / "multinode.yaml"), name="Spo_Try",
                        workspace_claim="shared", overrides=on_volume, params_in_pod="/kfp-workspace/params.yaml")


def test_trainjob_names_are_rfc1035_labels_new_for_each_attempt() -> None:
    first, second = (trainjob_name("dpo_spo_s0", "9F2C1D3E-aaaa-bbbb"),
                     trainjob_name("dpo_spo_s0", "9F2C1D3E-aaaa-bbbb"))
    assert first != second and first.startswith("spo-dpo-spo-s0-9f2c1d3e-") and len(first) <= 63
    assert len(trainjob_name("x" * 80, "run")) <= 63


# --------------------------------------------------------------------------- the launcher


@pytest.fixture
def server() -> Iterator[TrainJobApi]:
    api = TrainJobApi().start()
    yield api
    api.stop()


@pytest.fixture
def api(server: TrainJobApi) -> Iterator[k8s.CustomObjectsApi]:
    """The real kubernetes client, pointed at the loopback server."""
    configuration = k8s.Configuration(host=server.host)
    api_client = k8s.ApiClient(configuration)
    yield k8s.CustomObjectsApi(api_client)
    api_client.close()


class Lines(list):
    """The launcher's log lines."""

    def text(self) -> str:
        return "\n".join(self)


def test_launch_creates_the_built_job_logs_each_change_and_returns_on_complete(
        server: TrainJobApi, api: k8s.CustomObjectsApi) -> None:
    server.script = [{}, running(active=2, ready=0), running(active=2, ready=0), running(active=2, ready=2), complete()]
    manifest, log = a_job(), Lines()
    done = launch(manifest, namespace=NS, api=api, poll_seconds=POLL, log=log.append)
    assert done["status"]["conditions"][0]["type"] == "Complete"
    (created,) = server.calls("POST")
    assert created.path == f"/apis/trainer.kubeflow.org/v1alpha1/namespaces/{NS}/trainjobs"
    assert created.query == {"fieldValidation": ["Strict"]}  # the API server refuses unknown fields too
    assert created.body == {**manifest, "metadata": {**manifest["metadata"], "namespace": NS}}
    validate_trainjob(created.body)
    assert len(server.calls("GET")) == 5 and not server.calls("DELETE")
    text = log.text()
    assert all(line[:4].isdigit() and line[19] == "Z" for line in log)  # each line starts with a UTC timestamp
    assert f"TrainJob {NS}/spo-dpo-1234abcd-0a0b: created (2 node(s) x 8 process(es), 8 nvidia.com/gpu" in text
    assert f"kubectl logs -n {NS} -l jobset.sigs.k8s.io/jobset-name=spo-dpo-1234abcd-0a0b -c node" in text
    assert "no status yet" in text and "0 ready" in text and "2 ready" in text
    assert sum("status after" in line for line in log) == 4  # one line per change, not per poll
    assert "complete after" in log[-1] and "jobset completed successfully" in log[-1]


def test_a_failed_job_raises_its_own_reason_and_message_and_is_kept(
        server: TrainJobApi, api: k8s.CustomObjectsApi) -> None:
    server.script = [running(), failed("FailedJobs", "jobset failed: node-1 OOMKilled")]
    with pytest.raises(TrainJobFailed) as caught:
        launch(a_job(), namespace=NS, api=api, poll_seconds=POLL, log=Lines().append)
    error = caught.value
    assert (error.reason, error.message) == ("FailedJobs", "jobset failed: node-1 OOMKilled")
    assert "failed after" in str(error) and "FailedJobs: jobset failed: node-1 OOMKilled" in str(error)
    assert "kubectl logs" in str(error) and "kubectl delete trainjob" in str(error)
    assert not server.calls("DELETE") and server.jobs  # kept for inspection


def test_trainers_own_deadline_comes_back_as_a_failure(server: TrainJobApi, api: k8s.CustomObjectsApi) -> None:
    server.script = [failed("DeadlineExceeded", "TrainJob exceeded its active deadline")]
    with pytest.raises(TrainJobFailed, match="DeadlineExceeded: TrainJob exceeded its active deadline"):
        launch(a_job(), namespace=NS, api=api, poll_seconds=POLL, log=Lines().append)


def test_the_launchers_deadline_deletes_the_job(server: TrainJobApi, api: k8s.CustomObjectsApi) -> None:
    server.script = [running()]
    log = Lines()
    clock = FakeClock()  # the deadline is measured on it: the same polls on any machine
    with pytest.raises(TrainJobTimeout, match="did not finish within 1m00s and was deleted"):
        launch(a_job(), namespace=NS, api=api, poll_seconds=15, deadline_seconds=60, log=log.append, clock=clock,
               sleep=clock.sleep)
    # looked at it at 0, 15, 30, 45 and 60 s, then deleted it: not before the deadline, and at once when it came
    assert len(server.calls("GET")) == 5 and clock.sleeps == [15] * 4 and clock.now == 60
    assert "not finished after the launcher's deadline of 1m00s" in log.text()
    (deleted,) = server.calls("DELETE")
    assert deleted.path.endswith("/trainjobs/spo-dpo-1234abcd-0a0b")
    assert deleted.query == {"propagationPolicy": ["Foreground"]}  # gone only once its pods are
    assert not server.jobs and "deleting it" in log.text()


@pytest.mark.parametrize(("status", "meaning"), [
    (403, "may not create trainjobs.trainer.kubeflow.org in namespace team-a"),
    (404, "is Kubeflow Trainer v2 (>= v2.2) installed?"),
    (422, "rejected the job"),
])
def test_an_api_refusal_is_surfaced_with_what_it_means(server: TrainJobApi, api: k8s.CustomObjectsApi, status: int,
                                                       meaning: str) -> None:
    server.inject("POST", Fault(status, "admission webhook said no"))
    with pytest.raises(TrainJobApiError) as caught:
        launch(a_job(), namespace=NS, api=api, poll_seconds=POLL, log=Lines().append)
    assert caught.value.status == status
    assert f"create failed: HTTP {status}" in str(caught.value) and "admission webhook said no" in str(caught.value)
    assert meaning in str(caught.value)
    assert len(server.calls("POST")) == 1  # a refusal is not retried


def test_transient_errors_are_retried_a_bounded_number_of_times(server: TrainJobApi, api: k8s.CustomObjectsApi) -> None:
    server.script = [running(), complete()]
    server.inject("POST", Fault(503, "etcd leader changed", after_applying=True))  # created, but the answer is lost
    server.inject("GET", Fault(500), Fault(502))
    log = Lines()
    launch(a_job(), namespace=NS, api=api, poll_seconds=POLL, log=log.append)
    assert len(server.calls("POST")) == 2  # the retry's 409 is our own first try
    assert "create: HTTP 503" in log.text() and "try 2/5" in log.text() and "get: HTTP 502" in log.text()

    server.jobs.clear()
    server.inject("GET", *[Fault(500, "still broken")] * 3)
    with pytest.raises(TrainJobApiError, match=r"get failed after 3 tries: HTTP 500.*still broken"):
        launch(a_job(), namespace=NS, api=api, poll_seconds=POLL, log=Lines().append, attempts=3)


def test_an_unreachable_api_server_is_a_clear_error() -> None:
    clock = FakeClock()
    with socket.socket() as probe:  # a port nobody listens on: kept bound, so no other process takes it meanwhile
        probe.bind(("127.0.0.1", 0))
        configuration = k8s.Configuration(host=f"http://127.0.0.1:{probe.getsockname()[1]}")
        configuration.retries = 0
        with k8s.ApiClient(configuration) as api_client:
            with pytest.raises(TrainJobApiError, match="cannot reach the Kubernetes API after 2 tries") as caught:
                launch(a_job(), namespace=NS, api=k8s.CustomObjectsApi(api_client), poll_seconds=POLL,
                       log=Lines().append, attempts=2, clock=clock, sleep=clock.sleep)
    assert caught.value.status == 0
    assert clock.sleeps == [POLL]  # one retry, after the first backoff (the poll interval)


def _signal_when_running(server: TrainJobApi, signum: int) -> FakeClock:
    """A clock for :func:`launch` that delivers ``signum`` to this process during its second wait
    between polls, i.e. once the launcher has polled the running job twice: at that exact point,
    not whenever a thread got to it. ``signal.raise_signal`` delivers it to the calling (main)
    thread, whose Python handler runs before the call returns."""
    def fire(sleeps: int) -> None:
        if sleeps == 2:
            assert server.gets == 2
            signal.raise_signal(signum)

    return FakeClock(on_sleep=fire)


class _Stray(Exception):
    pass


@pytest.fixture
def guarded_sigterm() -> Iterator[None]:
    """Should launch not catch SIGTERM, the test fails instead of the test process dying."""
    def stray(signum: int, frame: Any) -> None:
        raise _Stray("SIGTERM reached the test's own handler: launch installed none")

    previous = signal.signal(signal.SIGTERM, stray)
    yield
    signal.signal(signal.SIGTERM, previous)


@pytest.mark.usefixtures("guarded_sigterm")
def test_sigterm_while_running_deletes_the_job_then_propagates(server: TrainJobApi, api: k8s.CustomObjectsApi) -> None:
    server.script = [running()]
    log = Lines()
    clock = _signal_when_running(server, signal.SIGTERM)
    with pytest.raises(Terminated):
        launch(a_job(), namespace=NS, api=api, poll_seconds=POLL, log=log.append, clock=clock, sleep=clock.sleep)
    assert len(server.calls("GET")) == 2 and clock.sleeps == [POLL, POLL]  # stopped following at the signal
    assert len(server.calls("DELETE")) == 1 and not server.jobs  # not left running
    assert "cancelled (SIGTERM)" in log.text() and log[-1].endswith(": deleted")
    assert signal.getsignal(signal.SIGTERM).__name__ == "stray"  # the previous handler is back


@pytest.fixture
def python_sigint() -> Iterator[None]:
    """Python's own SIGINT handler for the test: a runner started in the background by a shell
    without job control inherits SIGINT ignored, and then no KeyboardInterrupt would ever come."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.usefixtures("python_sigint")
def test_keyboard_interrupt_deletes_the_job_then_propagates(server: TrainJobApi, api: k8s.CustomObjectsApi) -> None:
    server.script = [running()]
    log = Lines()
    clock = _signal_when_running(server, signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        launch(a_job(), namespace=NS, api=api, poll_seconds=POLL, log=log.append, clock=clock, sleep=clock.sleep)
    assert len(server.calls("GET")) == 2 and clock.sleeps == [POLL, POLL]
    assert len(server.calls("DELETE")) == 1 and not server.jobs
    assert "cancelled (interrupted)" in log.text()


@pytest.mark.usefixtures("python_sigint")
def test_a_cancel_whose_delete_fails_says_how_to_delete_by_hand(server: TrainJobApi, api: k8s.CustomObjectsApi) -> None:
    server.script = [running()]
    server.inject("DELETE", Fault(403, "cannot delete"))
    log = Lines()
    clock = _signal_when_running(server, signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        launch(a_job(), namespace=NS, api=api, poll_seconds=POLL, log=log.append, clock=clock, sleep=clock.sleep)
    assert len(server.calls("DELETE")) == 1  # tried once: a 403 is not retried
    assert "could NOT delete it" in log.text()
    assert f"kubectl delete trainjob -n {NS} spo-dpo-1234abcd-0a0b" in log.text()


# --------------------------------------------------------------------------- the launcher task's step


def test_the_step_stages_its_inputs_on_the_workspace_and_hands_the_trained_model_back_as_its_artifact(
        tmp_path: Path, server: TrainJobApi, api: k8s.CustomObjectsApi, monkeypatch: pytest.MonkeyPatch) -> None:
    from kfp import dsl

    from spo.pipelines.components import train_job
    from spo.pipelines.runtime import model_dir

    workspace = tmp_path / "ws"
    rows, degrees, reference = tmp_path / "validated", tmp_path / "degrees", tmp_path / "reference"
    for folder in (rows, degrees, reference):
        folder.mkdir()
        (folder / "train.jsonl").write_text("{}\n")
    sft = dsl.Model(uri=str(tmp_path / "sft-artifact"))  # the SFT step's artifact, downloaded into this pod
    Path(sft.path).mkdir()
    (Path(sft.path) / "model.safetensors").write_bytes(b"sft weights")

    seen: dict[str, bytes] = {}

    def train_and_complete(job: dict[str, Any]) -> dict[str, Any]:
        """What the trainer pods would do: read their staged inputs, write the model folder and the
        metrics file on the volume."""
        args = job["spec"]["trainer"]["args"]
        paths = dict(a.split("=", 1) for a in args[3::2])
        staged = Path(args[1]).parent
        seen.update({str(p.relative_to(staged)): p.read_bytes() for p in staged.rglob("*") if p.is_file()})
        Path(json.loads(paths["train.out_dir"]), "adapter.bin").write_bytes(b"weights")
        Path(json.loads(paths["train.metrics_file"])).write_text(json.dumps({"train": {"loss": 0.5}}))
        return complete()

    server.script = [train_and_complete]  # the task polls every 15 s: complete at the first look
    monkeypatch.setattr(launcher_module, "custom_objects_api", lambda: api)
    monkeypatch.setattr(launcher_module, "current_namespace", lambda: NS)
    monkeypatch.setenv("KFP_POD_NAME", "spo-pipeline-x7k2q-system-container-impl-123")
    server.pods[(NS, "spo-pipeline-x7k2q-system-container-impl-123")] = {
        "pipeline/runid": "7e57c0de-0000-4000-8000-000000000000"}
    config = dsl.TaskConfig(volumes=[{"name": "kfp-workspace",
                                      "persistentVolumeClaim": {"claimName": "run-7-kfp-workspace"}}],
                            volume_mounts=[{"name": "kfp-workspace", "mountPath": str(workspace)}])
    policy, metrics = dsl.Model(uri=str(tmp_path / "policy")), dsl.Metrics(uri=str(tmp_path / "metrics.json"))
    # one cell of the grid, as the pipeline's loop hands it over (spo.pipelines.dag): its name and its settings
    settings = load_config(REPO / "params.yaml").cell_settings("dpo_spo", 0)
    assert settings == {"train.loss": "dpo", "train.spo.enabled": True, "train.seed": 0}
    train_job(params=(REPO / "params.yaml").read_text(), validated=dsl.Dataset(uri=str(rows)),
              degrees=dsl.Dataset(uri=str(degrees)), sft=sft, reference=dsl.Dataset(uri=str(reference)),
              workspace=str(workspace), cell="dpo_spo_s0", settings=json.dumps(settings, sort_keys=True),
              platform=multinode().model_dump_json(), task_config=config, policy=policy, metrics=metrics)

    (created,) = server.calls("POST")
    job = created.body
    validate_trainjob(job)
    name = job["metadata"]["name"]
    labels = job["metadata"]["labels"]
    assert name.startswith("spo-dpo-spo-s0-7e57c0de-") and labels["spo-pipeline/cell"] == "dpo-spo-s0"
    assert "spo-pipeline/variant" not in labels
    assert labels["pipeline/runid"] == "7e57c0de-0000-4000-8000-000000000000"
    # owned by the launcher's pod: Kubernetes' garbage collector deletes the job with the pod, whether or not
    # a SIGTERM ever reached the launcher (the cleanup in launch() covers only that case)
    assert job["metadata"]["ownerReferences"] == [{
        "apiVersion": "v1", "kind": "Pod", "name": "spo-pipeline-x7k2q-system-container-impl-123",
        "uid": "uid-spo-pipeline-x7k2q-system-container-impl-123", "controller": False, "blockOwnerDeletion": False}]
    staged = workspace / "trainjobs" / name
    assert seen["rows/train.jsonl"] == seen["degrees/train.jsonl"] == seen["reference/train.jsonl"] == b"{}\n"
    assert seen["params.yaml"] == (REPO / "params.yaml").read_bytes()
    args = job["spec"]["trainer"]["args"]
    assert args[:2] == ["-p", str(staged / "params.yaml")]
    assert seen["sft/model.safetensors"] == b"sft weights"  # the trainer pods see the volume only
    assert not staged.exists()  # once the job is done its copies of the inputs are removed
    assert f'train.sft_dir="{staged}/sft"' in args and f'train.reference_dir="{staged}/reference"' in args
    assert {"train.spo.enabled=true", 'train.loss="dpo"', "train.seed=0"} <= set(args)  # the cell's settings
    pod = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    volumes = pod["template"]["spec"]["template"]["spec"]["volumes"]
    assert volumes[0] == {"name": "kfp-workspace", "persistentVolumeClaim": {"claimName": "run-7-kfp-workspace"}}
    assert f'train.out_dir="{workspace}/models/policy/dpo_spo_s0"' in args  # the single-pod task's folder: resumable
    # the artifact holds the weights themselves: a later run taking this step from KFP's cache needs no workspace
    shutil.rmtree(workspace)
    assert (Path(model_dir(policy)) / "adapter.bin").read_bytes() == b"weights"
    assert policy.metadata["files"] == 1 and len(policy.metadata["sha256"]) == 64
    # each output names its cell: generate, report and publish place the collected lists by it
    assert policy.metadata["cell"] == "dpo_spo_s0"
    assert metrics.metadata == {"train.loss": 0.5, "cell": "dpo_spo_s0"}
    assert json.loads(Path(metrics.path).read_text()) == {"train": {"loss": 0.5}}


def test_on_the_checkpoint_volume_the_step_works_in_its_runs_folder_and_leaves_it_empty(
        tmp_path: Path, server: TrainJobApi, api: k8s.CustomObjectsApi, monkeypatch: pytest.MonkeyPatch) -> None:
    """The platform's fixed claim, not the run's workspace (whose per-run name would keep the step out
    of KFP's cache: test_train_cacheable): the pods mount it, the run's folder on it holds the work."""
    from kfp import dsl

    from spo.kube.platform import RUN_NAME_ENV, CheckpointVolume
    from spo.pipelines.components import train_job

    volume, inputs = tmp_path / "ckpt", tmp_path / "in"
    volume.mkdir()
    inputs.mkdir()
    (inputs / "train.jsonl").write_text("{}\n")
    platform = multinode().model_copy(update={"checkpoints": CheckpointVolume(claim="spo-checkpoints",
                                                                              mount_path=str(volume))})

    def train_and_complete(job: dict[str, Any]) -> dict[str, Any]:
        paths = dict(a.split("=", 1) for a in job["spec"]["trainer"]["args"][3::2])
        Path(json.loads(paths["train.out_dir"]), "model.safetensors").write_bytes(b"weights")
        Path(json.loads(paths["train.metrics_file"])).write_text(json.dumps({"train": {"loss": 0.5}}))
        return complete()

    server.script = [train_and_complete]
    monkeypatch.setattr(launcher_module, "custom_objects_api", lambda: api)
    monkeypatch.setattr(launcher_module, "current_namespace", lambda: NS)
    monkeypatch.setenv(RUN_NAME_ENV, "spo-pipeline-x7k2q")
    policy = dsl.Model(uri=str(tmp_path / "policy"))
    settings = load_config(REPO / "params.yaml").cell_settings("dpo", 0)
    train_job(params=(REPO / "params.yaml").read_text(), validated=dsl.Dataset(uri=str(inputs)),
              degrees=dsl.Dataset(uri=str(inputs)), sft=dsl.Model(uri=str(inputs)),
              reference=dsl.Dataset(uri=str(inputs)), workspace=str(volume), cell="dpo_s0",
              settings=json.dumps(settings), platform=platform.model_dump_json(), task_config=dsl.TaskConfig(),
              policy=policy, metrics=dsl.Metrics(uri=str(tmp_path / "metrics.json")))
    (created,) = server.calls("POST")
    args = created.body["spec"]["trainer"]["args"]
    assert f'train.out_dir="{volume}/spo-pipeline-x7k2q/models/policy/dpo_s0"' in args  # the same for a retry
    assert "train.spo.enabled=false" in args
    pod = created.body["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    assert pod["template"]["spec"]["template"]["spec"]["volumes"][0] == {
        "name": "kfp-workspace", "persistentVolumeClaim": {"claimName": "spo-checkpoints"}}
    assert (Path(policy.path) / "model.safetensors").read_bytes() == b"weights"
    assert list(volume.iterdir()) == []  # stored: nothing of the run is left on the shared volume


def test_the_run_id_comes_from_the_pods_label_and_its_absence_is_only_a_warning(
        server: TrainJobApi, api: k8s.CustomObjectsApi, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    from spo.cluster.launcher import launcher_pod

    def pipeline_run_id(api: k8s.CustomObjectsApi, namespace: str) -> str | None:
        pod = launcher_pod(api, namespace)
        return pod.run_id if pod else None

    monkeypatch.setenv("KFP_POD_NAME", "task-pod")
    server.pods[(NS, "task-pod")] = {"pipeline/runid": "run-42", "workflows.argoproj.io/workflow": "spo-abc"}
    assert pipeline_run_id(api, NS) == "run-42"
    assert server.calls("GET")[-1].path == f"/api/v1/namespaces/{NS}/pods/task-pod"
    server.inject("GET", Fault(403, 'pods "task-pod" is forbidden: cannot get resource "pods"'))
    assert pipeline_run_id(api, NS) is None
    assert "grant 'get' on pods" in caplog.text and "403" in caplog.text
    monkeypatch.delenv("KFP_POD_NAME")
    requests = len(server.requests)
    assert pipeline_run_id(api, NS) is None and len(server.requests) == requests  # not in a KFP pod: no call


def test_a_bad_param_fails_the_step_before_any_job_is_created(tmp_path: Path, server: TrainJobApi,
                                                              api: k8s.CustomObjectsApi) -> None:
    from kfp import dsl

    from spo.errors import ConfigError

    workspace, rows = tmp_path / "ws", tmp_path / "rows"
    rows.mkdir()
    params = (REPO / "params.yaml").read_text() + "\nbogus_section: {}\n"
    config = dsl.TaskConfig(volumes=[{"name": "w", "persistentVolumeClaim": {"claimName": "c"}}],
                            volume_mounts=[{"name": "w", "mountPath": str(workspace)}])
    with pytest.raises(ConfigError, match="bogus_section"):
        run_train_job(params=params, cell="dpo_s0", settings={"train.loss": "dpo", "train.spo.enabled": False,
                                                              "train.seed": 0},
                      rows_dir=str(rows), degrees_dir=str(rows), sft_dir=str(workspace / "sft"),
                      reference_dir=str(rows), workspace=str(workspace),
                      platform_json=multinode().model_dump_json(), run_id="r", task_config=config,
                      metrics_file=str(tmp_path / "m.json"), namespace=NS, api=api)
    assert not server.requests and not (workspace / "trainjobs").exists()  # nothing staged either
    with pytest.raises(ConfigError, match=r"train\.loss: Input should be"):  # nor a bad setting of the cell's
        run_train_job(params=(REPO / "params.yaml").read_text(), cell="bogus_s0",
                      settings={"train.loss": "bogus", "train.spo.enabled": False, "train.seed": 0},
                      rows_dir=str(rows), degrees_dir=str(rows), sft_dir=str(workspace / "sft"),
                      reference_dir=str(rows), workspace=str(workspace),
                      platform_json=multinode().model_dump_json(), run_id="r", task_config=config,
                      metrics_file=str(tmp_path / "m.json"), namespace=NS, api=api)
    assert not server.requests and not (workspace / "trainjobs").exists()


def test_the_workspace_claim_comes_from_the_task_config() -> None:
    from kfp import dsl

    config = dsl.TaskConfig(volumes=[{"name": "other", "configMap": {"name": "x"}},
                                     {"name": "kfp-workspace",
                                      "persistentVolumeClaim": {"claimName": "wf-1-kfp-workspace"}}],
                            volume_mounts=[{"name": "other", "mountPath": "/etc/x"},
                                           {"name": "kfp-workspace", "mountPath": "/kfp-workspace"}])
    assert workspace_claim(config, "/kfp-workspace") == "wf-1-kfp-workspace"
    with pytest.raises(TrainJobError, match="KFP >= 2.15"):
        workspace_claim(dsl.TaskConfig(), "/kfp-workspace")


# --------------------------------------------------------------------------- the compiled pipelines


def _compile(tmp_path: Path, platform: str) -> tuple[dict[str, Any], dict[str, Any]]:
    from spo.pipelines.compile import compile_pipeline

    out = compile_pipeline(tmp_path / f"{platform}.yaml", params=REPO / "params.yaml",
                           platform=PLATFORMS / f"{platform}.yaml")
    spec, platform_spec = [d for d in yaml.safe_load_all(out.read_text()) if d]
    return spec, platform_spec["platforms"]["kubernetes"]


def _loop(spec: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The grid's loop task (``dsl.ParallelFor`` over the cells) and its component."""
    (task,) = [t for t in spec["root"]["dag"]["tasks"].values() if "parameterIterator" in t]
    return task, spec["components"][task["componentRef"]["name"]]


def _tasks(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every step's task: the pipeline's, and the one inside the grid's loop in place of the loop."""
    tasks = {name: t for name, t in spec["root"]["dag"]["tasks"].items() if "parameterIterator" not in t}
    return {**tasks, **_loop(spec)[1]["dag"]["tasks"]}


def _cells(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The loop's items: one per cell, its name and its train settings."""
    return json.loads(_loop(spec)[0]["parameterIterator"]["items"]["raw"])


def _container(spec: dict[str, Any], task: str) -> dict[str, Any]:
    component = _tasks(spec)[task]["componentRef"]["name"]
    return spec["deploymentSpec"]["executors"][spec["components"][component]["executorLabel"]]["container"]


def test_multinode_pipeline_launches_trainjobs_from_cpu_pods(tmp_path: Path) -> None:
    spec, k8s_spec = _compile(tmp_path, "multinode")
    tasks, root = _tasks(spec), spec["root"]["dag"]["tasks"]
    loop, body = _loop(spec)
    # one launcher task in the grid's loop, one iteration per cell (variants x grid.seeds), none outside it
    assert set(body["dag"]["tasks"]) == {"train-job"} and not {"train", "train-2", "train-job-2"} & set(tasks)
    assert not {"train", "train-job"} & set(root)
    assert [c["cell"] for c in _cells(spec)] == [c.name for c in load_config(REPO / "params.yaml").cells()]
    assert loop["taskInfo"]["name"] == "grid"
    assert set(root["generate"]["dependentTasks"]) >= {next(n for n, t in root.items() if t is loop)}
    assert root["generate"]["inputs"]["artifacts"]["policies"]["taskOutputArtifact"]["outputArtifactKey"] \
        == "pipelinechannel--train-job-policy"  # every cell's policy, collected from the launcher tasks
    assert not [n for n in spec["deploymentSpec"]["executors"] if n.startswith("exec-train") and n != "exec-train-job"]
    task = tasks["train-job"]
    assert task["taskInfo"]["name"] == "train" and task["componentRef"]["name"] == "comp-train-job"
    resources = _container(spec, "train-job")["resources"]
    assert "accelerator" not in resources and resources["resourceMemoryLimit"] == "16Gi"  # the cpu pool
    executor = k8s_spec["deploymentSpec"]["executors"]["exec-train-job"]
    assert "nodeSelector" not in executor and "tolerations" not in executor
    assert task["retryPolicy"]["maxRetryCount"] == 1  # the train pool's retries: a new TrainJob per retry
    assert task["cachingOptions"] == {"enableCache": True}  # its model is an artifact: reusable by a later run
    platform = json.loads(task["inputs"]["parameters"]["platform"]["runtimeValue"]["constant"])
    assert platform["pools"]["gpu-multinode"]["nodes"] == 2
    parameters = task["inputs"]["parameters"]
    assert set(parameters) == {"params", "workspace", "cell", "settings", "platform"}
    assert "run_id" not in parameters  # a per-run input would defeat the cache
    for key in ("cell", "settings"):  # each iteration's own cell, from the loop's item
        assert parameters[key]["componentInputParameter"] == loop["parameterIterator"]["itemInput"]
        assert parameters[key]["parameterExpressionSelector"] == f'parseJson(string_value)["{key}"]'
    component = spec["components"]["comp-train-job"]
    assert set(component["outputDefinitions"]["artifacts"]) == {"policy", "metrics"}  # as train's
    assert set(component["inputDefinitions"]["artifacts"]) == {"validated", "degrees", "sft", "reference"}
    passthrough = {p["field"]: p["applyToTask"] for p in component["taskConfigPassthroughs"]}
    assert passthrough["KUBERNETES_VOLUMES"] and all(passthrough.values()) and len(passthrough) == 6
    assert _container(spec, "sft")["resources"]["accelerator"]["count"] == "1"  # the other GPU steps as before
    # its pods work on the checkpoint volume (a fixed claim: the step stays cacheable), so no run has a workspace PVC
    assert "workspace" not in k8s_spec.get("pipelineConfig", {})
    assert parameters["workspace"] == {"runtimeValue": {"constant": "/spo-checkpoints"}}
    assert executor["pvcMount"][0]["constant"] == "spo-checkpoints"
    from spo.pipelines.compile import compile_pipeline

    compile_pipeline(tmp_path / "k8s.yaml", params=REPO / "params.yaml", platform=PLATFORMS / "multinode.yaml",
                     kubernetes_manifests=True, namespace="spo")  # the Pipeline resources, validated strictly


@pytest.mark.parametrize("platform", ["local", "gpu"])
def test_single_node_pipelines_keep_the_single_pod_train(tmp_path: Path, platform: str) -> None:
    spec, _ = _compile(tmp_path, platform)
    tasks = _tasks(spec)
    # the single-pod train task in the grid's loop, one iteration per cell
    assert set(_loop(spec)[1]["dag"]["tasks"]) == {"train"} and "train" not in spec["root"]["dag"]["tasks"]
    assert tasks["train"]["componentRef"]["name"] == "comp-train" and "train-2" not in tasks
    assert [c["cell"] for c in _cells(spec)] == [c.name for c in load_config(REPO / "params.yaml").cells()]
    assert not any(name.startswith("comp-train-job") for name in spec["components"])
    assert "taskConfigPassthroughs" not in json.dumps(spec)
    assert set(tasks["train"]["inputs"]["parameters"]) == {"params", "checkpoints", "cell", "settings"}
    gpu = _container(spec, "train")["resources"].get("accelerator")
    assert (gpu is not None) == (platform == "gpu")


def test_pools_env_and_secrets_reach_single_pod_tasks_too(tmp_path: Path) -> None:
    data = yaml.safe_load((PLATFORMS / "gpu.yaml").read_text())
    data["pools"]["gpu"]["env"] = {"NCCL_DEBUG": "INFO"}
    data["pools"]["gpu"]["secret_env"] = {"HF_TOKEN": {"name": "hf", "key": "token"}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(data))
    from spo.pipelines.compile import compile_pipeline

    out = compile_pipeline(tmp_path / "out.yaml", params=REPO / "params.yaml", platform=tmp_path / "p.yaml")
    spec, platform_spec = [d for d in yaml.safe_load_all(out.read_text()) if d]
    assert {"name": "NCCL_DEBUG", "value": "INFO"} in _container(spec, "sft")["env"]
    executor = platform_spec["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-sft"]
    (secret,) = executor["secretAsEnv"]
    assert secret["secretName"] == "hf" and secret["keyToEnv"] == [{"envVar": "HF_TOKEN", "secretKey": "token"}]
    assert "env" not in _container(spec, "prepare")  # the cpu pool has none
    # a GPU task says how many GPUs it was given, so it stops at once when it cannot use them
    assert {"name": "SPO_PLACED_GPUS", "value": "1"} in _container(spec, "sft")["env"]
