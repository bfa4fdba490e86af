"""charts/spo, rendered by Helm's own engine: lint, strict Kubernetes schemas, the restricted pod
security standard, GPU placement equal to what the compiled pipeline carries, no secret outside a
Secret, the values schema's refusals, a policy scan, and the upload hook run for real against a
loopback KFP API (twice: the second creates nothing) followed by the `helm test` pod's check.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from chart_helpers import (
    CHART,
    KUBERNETES_VERSION,
    NAMESPACE,
    RELEASE,
    deep_merge,
    example,
    objects,
    one,
    render,
    write_manifests,
)
from conftest import REPO
from kfp_api_server import KfpApiServer

VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
CASES = {"default": {}, "gpu-pools": example("gpu-pools"), "multinode": example("multinode"),
         "kubernetes-store": {"kfp": {"pipelineStore": "kubernetes", "namespace": NAMESPACE},  # a profile namespace
                              "networkPolicy": {"apiServer": {"cidrs": ["10.96.0.1/32"]}}}}
CHECKOV = REPO / "build" / "checkov-venv" / "bin" / "checkov"
UPLOAD, RECURRING = r"/apis/v2beta1/pipelines/upload(_version)?", r"/apis/v2beta1/recurringruns"


def _pods(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(object name, pod spec) of every object that makes pods."""
    out = []
    for doc in docs:
        if doc["kind"] == "Pod":
            out.append((doc["metadata"]["name"], doc["spec"]))
        elif doc["kind"] == "Job":
            out.append((doc["metadata"]["name"], doc["spec"]["template"]["spec"]))
    return out


# --------------------------------------------------------------------------- lint and schemas


@pytest.mark.parametrize("case", CASES)
def test_the_chart_lints_clean(case: str) -> None:
    import helm_python as helm

    report = helm.lint(str(CHART), values=CASES[case], strict=True, namespace=NAMESPACE)
    assert report["errors"] == [] and report["total_charts_linted"] == 1
    assert [m for m in report["messages"] if m["severity"] > 1] == []  # info only ("icon is recommended")


@pytest.mark.parametrize("case", CASES)
def test_every_object_is_valid_kubernetes_labelled_and_namespaced(case: str) -> None:
    import kubernetes_validate

    docs = objects(CASES[case])
    assert ({"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Job", "Pod", "NetworkPolicy"}
            <= {d["kind"] for d in docs})
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)  # unknown fields are errors
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "spo" and labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["helm.sh/chart"] == "spo-0.1.0" and labels["app.kubernetes.io/managed-by"] == "Helm"
        assert doc["metadata"]["namespace"] in (NAMESPACE, CASES[case].get("kfp", {}).get("namespace"))
    assert not [d for d in docs if d["kind"].startswith("Cluster")]  # nothing cluster-wide


def test_strict_validation_would_catch_a_typo() -> None:
    """The validator the chart's objects pass is not a rubber stamp."""
    import kubernetes_validate

    job = one(objects(), "Job", "-upload-1")
    job["spec"]["template"]["spec"]["containers"][0]["securityContex"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="securityContex"):
        kubernetes_validate.validate(job, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("case", CASES)
def test_every_pod_meets_the_restricted_pod_security_standard(case: str) -> None:
    pods = _pods(objects(CASES[case]))
    assert {name.rsplit("-", 1)[0] for name, _ in pods} >= {f"{RELEASE}-upload", f"{RELEASE}-test-pipeline"}
    for name, spec in pods:
        assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] >= 10000, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert spec["automountServiceAccountToken"] is False, name
        assert all("hostPath" not in v for v in spec["volumes"]) and not spec.get("hostNetwork"), name
        for container in spec["containers"]:
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, name
            assert sc["capabilities"] == {"drop": ["ALL"]} and "add" not in sc["capabilities"], name
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][bound]), (name, bound)


@pytest.mark.parametrize("case", CASES)
def test_no_pod_of_the_chart_gets_an_istio_sidecar(case: str) -> None:
    """In a Kubeflow profile namespace (istio-injection=enabled) a sidecar would be cut off from istiod by
    the chart's own NetworkPolicy and hold the hook until Helm's timeout. Istio's injector skips a pod
    labelled sidecar.istio.io/inject=false whatever its namespace says (istio/istio
    pkg/kube/inject/inject.go at 00af2c5, injectRequired: the label, preferred to the annotation, is an
    explicit "no" that the namespace's enabled policy does not override)."""
    docs = objects(CASES[case])
    pod_metadata = [d["metadata"] for d in docs if d["kind"] == "Pod"]
    pod_metadata += [d["spec"]["template"]["metadata"] for d in docs if d["kind"] == "Job"]
    assert len(pod_metadata) >= 2
    for metadata in pod_metadata:
        assert metadata["labels"]["sidecar.istio.io/inject"] == "false", metadata


def test_rbac_is_least_privilege_and_namespaced() -> None:
    docs = objects(CASES["multinode"])
    roles = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Role"}
    assert set(roles) == {f"{RELEASE}-uploader", f"{RELEASE}-trainjob-launcher"}
    for role in roles.values():
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
            assert not {"update", "patch", "escalate", "bind", "impersonate"} & set(rule["verbs"])
    launcher = roles[f"{RELEASE}-trainjob-launcher"]["rules"]
    assert {(r["apiGroups"][0], tuple(r["resources"]), tuple(r["verbs"])) for r in launcher} == {
        ("trainer.kubeflow.org", ("trainjobs",), ("get", "create", "delete")), ("", ("pods",), ("get",))}
    binding = one(docs, "RoleBinding", "-trainjob-launcher")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "default-editor", "namespace": "team-a"}]
    # single-node placement: no TrainJob, so no launcher Role at all
    assert {d["metadata"]["name"] for d in objects() if d["kind"] == "Role"} == {f"{RELEASE}-uploader"}


# --------------------------------------------------------------------------- placement


def _platform(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return yaml.safe_load(one(docs, "ConfigMap")["data"]["platform.yaml"])


def _compiled(tmp_path: Path, docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The pipeline the hook would compile, from the rendered ConfigMap's files."""
    from spo.pipelines.compile import compile_pipeline

    data = one(docs, "ConfigMap")["data"]
    for name in ("params.yaml", "platform.yaml", "dvc.yaml"):
        (tmp_path / name).write_text(data[name])
    out = compile_pipeline(tmp_path / "pipeline.yaml", params=tmp_path / "params.yaml",
                           platform=tmp_path / "platform.yaml")
    spec, platform_spec = [d for d in yaml.safe_load_all(out.read_text()) if d]
    return spec, platform_spec["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _step_tasks(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every step's task: the pipeline's, and the train task inside the grid's loop (``dsl.ParallelFor``
    over the cells, one iteration each) in place of the loop."""
    root = spec["root"]["dag"]["tasks"]
    (loop,) = [t for t in root.values() if "parameterIterator" in t]
    body = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    assert len(json.loads(loop["parameterIterator"]["items"]["raw"])) >= 2  # a cell per variant x seed
    return {**{name: t for name, t in root.items() if t is not loop}, **body}


@pytest.mark.parametrize("case", CASES)
def test_the_gpu_settings_of_the_values_are_what_the_compiled_pipeline_carries(tmp_path: Path, case: str) -> None:
    values = deep_merge(VALUES, CASES[case])
    docs = objects(CASES[case])
    spec, executors = _compiled(tmp_path, docs)
    tasks = _step_tasks(spec)
    assert {"train", "train-job"} & set(tasks) and not {"train-2", "train-job-2"} & set(tasks)
    checked = 0
    for task_name, task in tasks.items():
        step = task_name.replace("-", "_")
        step = "train" if step == "train_job" else step
        pool = values["pools"][values["steps"].get(step, values["defaultPool"])]
        launched = step == "train" and (pool.get("nodes", 1) > 1 or pool.get("processesPerNode", 1) > 1)
        executor_label = spec["components"][task["componentRef"]["name"]]["executorLabel"]
        resources = spec["deploymentSpec"]["executors"][executor_label]["container"].get("resources", {})
        k8s = executors.get(executor_label, {})
        if launched:  # a CPU launcher pod; the GPUs are the TrainJob's, from the platform it carries
            carried = json.loads(task["inputs"]["parameters"]["platform"]["runtimeValue"]["constant"])
            train_pool = carried["pools"][carried["steps"]["train"]]
            assert "accelerator" not in resources
            assert train_pool["accelerator"] == pool["accelerator"] and train_pool["nodes"] == pool["nodes"]
            assert train_pool["processes_per_node"] == pool["processesPerNode"]
            assert train_pool["node_selector"] == pool["nodeSelector"]
            continue
        accelerator = pool.get("accelerator")
        if accelerator:
            assert resources["accelerator"]["resourceType"] == accelerator["type"], task_name
            assert resources["accelerator"]["resourceCount"] == str(accelerator["count"]), task_name
            checked += 1
        else:
            assert "accelerator" not in resources, task_name
        assert k8s.get("nodeSelector", {}).get("labels", {}) == pool.get("nodeSelector", {}), task_name
        tolerations = [{k: int(v) if k == "tolerationSeconds" else v for k, v in t.items()
                        if k in ("key", "operator", "value", "effect", "tolerationSeconds")}
                       for t in k8s.get("tolerations", [])]
        assert tolerations == [{"operator": "Equal", **t} if "operator" not in t else t
                               for t in pool.get("tolerations", [])], task_name
        affinity = [{"matchExpressions": a["matchExpressions"], **({"weight": a["weight"]} if a.get("weight") else {})}
                    for a in k8s.get("nodeAffinity", [])]
        assert affinity == pool.get("affinity", []), task_name
        assert resources.get("resourceMemoryLimit") == pool.get("limits", {}).get("memory"), task_name
    assert checked >= 4  # sft, train(s), generate or the judge: the GPU steps were checked


def test_two_gpu_pools_keep_their_own_tolerations(tmp_path: Path) -> None:
    spec, executors = _compiled(tmp_path, objects(CASES["gpu-pools"]))
    keys = {task: [t["key"] for t in executors[f"exec-{task}"].get("tolerations", [])]
            for task in ("sft", "train", "generate", "judge")}
    assert keys == {"sft": ["nvidia.com/gpu", "dedicated"], "train": ["nvidia.com/gpu", "dedicated"],
                    "generate": ["nvidia.com/gpu", "spot"], "judge": []}
    assert executors["exec-prepare"]["pvcMount"][0]["mountPath"] == "/data"  # the data volume, prepare only
    mounts = {name: [m["mountPath"] for m in e["pvcMount"]] for name, e in executors.items() if "pvcMount" in e}
    # and the data version (what prepare's cache key follows) and the checkpoint volume, the train steps only
    # (one train executor: the task in the grid's loop, every cell's)
    assert mounts == {"exec-data-version": ["/data"], "exec-prepare": ["/data"], "exec-train": ["/spo-checkpoints"]}


# --------------------------------------------------------------------------- secrets


def test_no_secret_value_reaches_a_configmap_or_an_annotation() -> None:
    key_id, secret_key = "AKIA" + "EXAMPLEKEYID42", "s3cr3t/" + "VALUE+that-must-stay-secret"
    values = deep_merge(CASES["gpu-pools"], {"dvcRemote": {"credentials": {
        "existingSecret": "", "create": True, "accessKeyId": key_id, "secretAccessKey": secret_key}}})
    docs = objects(values)
    texts = {d["kind"] + "/" + d["metadata"]["name"]: d for d in docs}
    secret = one(docs, "Secret")
    assert set(secret["data"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    for name, doc in texts.items():
        if doc["kind"] == "Secret":
            continue
        dumped = json.dumps(doc)
        assert key_id not in dumped and secret_key not in dumped, name
        for notes in _annotations(doc):
            assert all(key_id not in v and secret_key not in v for v in notes.values()), name
    platform = _platform(docs)
    assert platform["dvc_remote"]["credentials_secret"]["name"] == secret["metadata"]["name"]
    assert platform["judge_api_key"] == {"name": "spo-judge", "key": "api-key"}  # by reference only


def _annotations(doc: Any) -> list[dict[str, str]]:
    found = []
    if isinstance(doc, dict):
        for key, value in doc.items():
            if key == "annotations" and isinstance(value, dict):
                found.append(value)
            found += _annotations(value)
    elif isinstance(doc, list):
        for item in doc:
            found += _annotations(item)
    return found


# --------------------------------------------------------------------------- values the schema refuses


BAD_VALUES = {
    "a negative GPU count": ({"pools": {"gpu": {"accelerator": {"type": "nvidia.com/gpu", "count": -1}}}},
                             r"/pools/gpu/accelerator/count.*minimum"),
    "a fractional GPU count": ({"pools": {"gpu": {"accelerator": {"type": "nvidia.com/gpu", "count": 0.5}}}},
                               r"/pools/gpu/accelerator/count.*integer"),
    "an unknown step": ({"steps": {"finetune": "gpu"}}, r"at '/steps': additional properties 'finetune' not allowed"),
    "a missing image repository": ({"image": {"repository": ""}}, r"/image/repository.*minLength"),
    "an unknown access mode": ({"storage": {"workspace": {"accessModes": ["ReadWriteAll"]}}},
                               r"/storage/workspace/accessModes/0.*ReadWriteOnce"),
    "a judge key as a plain value": ({"judge": {"backend": "openai", "apiKey": "sk-live-1234"}},
                                     r"/judge/apiKey.*got string, want object"),
    "the openai judge without its Secret": ({"judge": {"backend": "openai"}},
                                            r"/judge/apiKey/existingSecret.*minLength"),
    "a misspelled key": ({"pools": {"gpu": {"nodeSelectors": {"a": "b"}}}}, r"additional properties 'nodeSelectors'"),
    "credentials in the DVC URL": ({"dvcRemote": {"enabled": True, "url": "s3://key:secret@bucket/x"}},
                                   r"/dvcRemote/url"),
    "a run on install and a schedule": ({"run": {"onInstall": True, "schedule": "0 0 3 * * *"}}, r"/run"),
    # KFP parses cron seconds first (robfig/cron's Parse): a crontab line would run hourly (test_submit.py)
    "a 5-field crontab schedule": ({"run": {"schedule": "0 3 * * *"}}, r"/run/schedule"),
}


@pytest.mark.parametrize("case", BAD_VALUES)
def test_bad_values_are_refused_naming_the_value(case: str) -> None:
    import helm_python as helm

    values, message = BAD_VALUES[case]
    with pytest.raises(helm.HelmValuesError) as refused:
        render(values)
    assert re.search(message, str(refused.value), re.S), str(refused.value)
    assert "sk-live-1234" not in str(refused.value)


def test_a_step_on_an_undefined_pool_is_refused_by_name() -> None:
    import helm_python as helm

    with pytest.raises(helm.HelmRenderError, match=r'steps.train: pool "h200" is not defined under pools \(cpu, gpu\)'):
        render({"steps": {"train": "h200"}})


# --------------------------------------------------------------------------- policy scan


def _documented_skips() -> dict[str, str]:
    """check id -> reason, from docs/operations.md's table of policy-scan skips."""
    text = (REPO / "docs" / "operations.md").read_text()
    section = text.split("## Policy scan", 1)[1].split("\n## ", 1)[0]
    return {m[1]: m[2].strip() for m in re.finditer(r"^\| `(CKV2?_K8S_\d+)` \| [^|]+ \| ([^|]+) \|$", section, re.M)}


def _checkov(folder: Path, skips: list[str]) -> dict[str, Any]:
    assert CHECKOV.is_file(), f"{CHECKOV} is missing: run `make checkov` (checkov lives in a venv of its own)"
    command = [str(CHECKOV), "-d", str(folder), "--framework", "kubernetes", "-o", "json", "--compact",
               "--skip-download", "--quiet", "--soft-fail"]
    if skips:
        command += ["--skip-check", ",".join(skips)]
    # a hang guard only, generous because checkov is CPU-bound and may share the machine with other tests
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"})
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    return report[0] if isinstance(report, list) else report


def test_the_policy_scan_leaves_no_failed_check_unexplained(tmp_path: Path) -> None:
    skips = _documented_skips()
    assert skips and all(len(reason) > 20 for reason in skips.values()), skips
    folder = tmp_path / "manifests"
    for case, values in CASES.items():
        write_manifests(objects(values), folder / case)
    report = _checkov(folder, sorted(skips))
    failed = [(c["check_id"], c["resource"], c["file_path"])
              for c in report.get("results", {}).get("failed_checks", [])]
    assert failed == [], failed
    assert report["summary"]["passed"] > 100
    # every documented skip is still needed: without it, that check fails
    unskipped = _checkov(folder, [])
    needed = {c["check_id"] for c in unskipped.get("results", {}).get("failed_checks", [])}
    assert set(skips) <= needed, f"documented skips no check needs any more: {sorted(set(skips) - needed)}"


# --------------------------------------------------------------------------- the upload hook and helm test, for real


def _hook_command(doc: dict[str, Any], paths: dict[str, Path], host: str) -> list[str]:
    """The hook's (or the test pod's) container command, with its in-pod paths mapped onto ``paths``."""
    spec = doc["spec"]["template"]["spec"] if doc["kind"] == "Job" else doc["spec"]
    [container] = spec["containers"]
    command = [*container["command"], *container["args"]]
    out = []
    for arg in command:
        for in_pod, here in paths.items():
            arg = arg.replace(in_pod, str(here))
        out.append(re.sub(r"^--host=.*", f"--host={host}", arg))
    return out


def _run_pod(doc: dict[str, Any], config: dict[str, str], root: Path, host: str, token: str,
             extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    paths = {"/etc/spo": root / "config", "/var/run/secrets/kfp": root / "kfp", "/work": root / "work"}
    for folder in paths.values():
        folder.mkdir(parents=True, exist_ok=True)
    for name, text in config.items():
        (paths["/etc/spo"] / name).write_text(text)
    (paths["/var/run/secrets/kfp"] / "token").write_text(token)  # the projected service-account token
    env = {"PATH": f"{REPO / '.venv' / 'bin'}:{os.environ['PATH']}", "HOME": str(paths["/work"]),
           "TMPDIR": str(paths["/work"]), "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1", **(extra_env or {})}
    # the hook takes seconds: the bound only stops a hang (e.g. a wait on a server that never answers)
    return subprocess.run(_hook_command(doc, paths, host), capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_the_hook_refuses_a_release_outside_the_namespace_where_kfp_runs_the_pods(tmp_path: Path) -> None:
    """Single-user KFP (the fake's default) runs the pods in its own namespace, kubeflow here; a release in
    ml-team would leave prepare Pending on a PVC it cannot see. The hook says so and uploads nothing
    (kubeflow/pipelines resource_manager.go ReplaceNamespace at 2.17.0; test_submit.py)."""
    docs = objects({})
    with KfpApiServer("t" * 24) as server:
        refused = _run_pod(one(docs, "Job", "-upload-1"), one(docs, "ConfigMap")["data"], tmp_path, server.url,
                           "t" * 24)
        assert refused.returncode != 0 and "pods would run in 'kubeflow'" in refused.stderr, refused.stderr[-2000:]
        assert f"are in '{NAMESPACE}'" in refused.stderr and not server.calls("POST")


@pytest.mark.slow
def test_the_upload_hook_creates_nothing_when_rerun_and_helm_test_checks_its_version(tmp_path: Path) -> None:
    token = "projected-sa-token-" + "x" * 16
    # single-user KFP runs every pipeline pod in its own namespace: the release is installed there
    values = {"run": {"schedule": "0 0 3 * * *"}, "pipeline": {"parameters": {"train_steps": 200}},
              "networkPolicy": {"kfpNamespace": NAMESPACE}}
    docs = objects(values)
    config, hook, check = one(docs, "ConfigMap")["data"], one(docs, "Job", "-upload-1"), one(docs, "Pod")
    assert hook["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    assert check["metadata"]["annotations"]["helm.sh/hook"] == "test"
    with KfpApiServer(token) as server:
        before = _run_pod(check, config, tmp_path / "test-0", server.url, token)
        assert before.returncode != 0 and "never uploaded" in before.stderr  # helm test before any upload
        first = _run_pod(hook, config, tmp_path / "install", server.url, token)
        assert first.returncode == 0, first.stderr[-3000:]
        assert len(server.calls("POST", UPLOAD)) == 1 and len(server.state.recurring_runs) == 1
        [job] = server.state.recurring_runs.values()
        assert job["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * *"
        assert job["runtime_config"]["parameters"] == {"data_dir": "/data", "train_steps": 200}
        requests = len(server.calls("POST"))
        again = _run_pod(hook, config, tmp_path / "upgrade", server.url, token)  # helm upgrade, nothing changed
        assert again.returncode == 0, again.stderr[-3000:]
        assert len(server.calls("POST")) == requests and not server.calls("DELETE")  # nothing new
        after = _run_pod(check, config, tmp_path / "test-1", server.url, token)
        assert after.returncode == 0, after.stderr[-3000:]
        first_version = server.state.versions[next(iter(server.state.versions))][0]
        assert after.stdout.strip() == first_version["pipeline_version_id"]
        # an upgrade that changes a compiled-in override uploads one new version and moves the schedule to it
        changed = objects(deep_merge(values, {"pipeline": {"overrides": {"train.beta": 0.2}}}))
        upgraded = _run_pod(one(changed, "Job", "-upload-1"), one(changed, "ConfigMap")["data"], tmp_path / "upgrade-2",
                            server.url, token)
        assert upgraded.returncode == 0, upgraded.stderr[-3000:]
        assert len(server.calls("POST", UPLOAD)) == 2 and len(server.state.recurring_runs) == 1
        for result in (before, first, again, after, upgraded):
            assert token not in result.stdout + result.stderr


def test_chart_files_are_the_repositorys() -> None:
    """The chart ships params.yaml, dvc.yaml (as dvc-stages.yaml) and .dvcignore (Helm reads files
    inside the chart only): they must be the repository's (`make chart-files` copies them)."""
    for shipped, source in (("params.yaml", "params.yaml"), ("dvc-stages.yaml", "dvc.yaml"),
                            ("dvcignore", ".dvcignore")):
        assert (CHART / "files" / shipped).read_bytes() == (REPO / source).read_bytes(), shipped
    # never a file DVC takes for a pipeline of this project: `dvc repro` would run its stages too
    assert not [p for p in CHART.rglob("*") if p.name in ("dvc.yaml", "dvc.lock") or p.suffix == ".dvc"]


def test_notes_say_how_to_follow_the_run() -> None:
    notes = render(CASES["multinode"])["spo/templates/NOTES.txt"]
    assert f"kubectl logs -n {NAMESPACE} job/{RELEASE}-upload-1" in notes
    assert "A run was started" in notes and "kubectl get trainjobs -n team-a" in notes
    assert f"helm test {RELEASE}" in notes


@pytest.mark.slow
def test_the_hook_runs_in_the_image_as_its_pod_spec_says(tmp_path: Path) -> None:
    """The hook's container as the Job defines it — the project image, its command, env and mounts,
    uid 10001 on a read-only root with /work as its only writable place — gets as far as the KFP API:
    params prepared, pipeline compiled; the API is unreachable here (no network), which it reports."""
    from docker_helpers import docker_client, project_image

    docs = objects({"pipeline": {"overrides": {"train.beta": 0.2}}})
    hook = one(docs, "Job", "-upload-1")
    spec = hook["spec"]["template"]["spec"]
    [container] = spec["containers"]
    config, kfp = tmp_path / "config", tmp_path / "kfp"
    for folder, files in ((config, one(docs, "ConfigMap")["data"]), (kfp, {"token": "projected-token"})):
        folder.mkdir()
        folder.chmod(0o755)
        for name, text in files.items():
            (folder / name).write_text(text)
            (folder / name).chmod(0o644)
    user = spec["securityContext"]
    client = docker_client()
    run = client.containers.run(
        project_image("cpu"), container["args"], entrypoint=container["command"], detach=True, network_mode="none",
        user=f"{user['runAsUser']}:{user['runAsGroup']}",
        read_only=container["securityContext"]["readOnlyRootFilesystem"],
        cap_drop=["ALL"], security_opt=["no-new-privileges"], tmpfs={"/work": "rw,size=256m"},
        environment={e["name"]: e["value"] for e in container["env"]},
        volumes={str(config): {"bind": "/etc/spo", "mode": "ro"},
                 str(kfp): {"bind": "/var/run/secrets/kfp", "mode": "ro"}})
    try:
        status = run.wait(timeout=300)["StatusCode"]  # a hang guard: the hook fails within seconds here
        logs = run.logs().decode(errors="replace")
    finally:
        run.remove(force=True)
    assert status != 0 and "connecting" in logs and "ml-pipeline.kubeflow.svc.cluster.local" in logs, logs[-3000:]
    assert "Traceback" not in logs and "Read-only file system" not in logs and "Permission denied" not in logs, logs
    assert "projected-token" not in logs


@pytest.mark.slow
def test_the_kubernetes_store_hook_creates_the_resources_once(tmp_path: Path) -> None:
    """pipelineStore kubernetes: the hook's own command creates the Pipeline and PipelineVersion
    resources through the Kubernetes API (a loopback server; in the pod, its projected token), a
    rerun creates nothing, and the test pod finds the version there."""
    from k8s_api_server import TrainJobApi

    docs = objects(CASES["kubernetes-store"])
    hook, check, config = one(docs, "Job", "-upload-1"), one(docs, "Pod"), one(docs, "ConfigMap")["data"]
    [container] = hook["spec"]["template"]["spec"]["containers"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "--store=kubernetes" in container["args"] and "/var/run/secrets/kubernetes.io/serviceaccount" in mounts
    uploader = one(docs, "Role", "-uploader")
    assert {"apiGroups": ["pipelines.kubeflow.org"], "resources": ["pipelineversions"], "verbs": ["get", "create"]} \
        in uploader["rules"] and uploader["metadata"]["namespace"] == NAMESPACE
    policy = one(docs, "NetworkPolicy")
    assert {"ports": [{"protocol": "TCP", "port": 443}, {"protocol": "TCP", "port": 6443}],
            "to": [{"ipBlock": {"cidr": "10.96.0.1/32"}}]} in policy["spec"]["egress"]
    cluster = TrainJobApi().start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "loopback",
        "clusters": [{"name": "loopback", "cluster": {"server": cluster.host}}],
        "contexts": [{"name": "loopback", "context": {"cluster": "loopback", "user": "hook"}}],
        "users": [{"name": "hook", "user": {"token": "kube-token"}}]}))
    env = {"KUBECONFIG": str(kubeconfig)}  # in the pod: the projected token and in-cluster config
    try:
        with KfpApiServer(None, multi_user=True) as server:  # a profile namespace: multi-user KFP
            first = _run_pod(hook, config, tmp_path / "install", server.url, "kfp-token", env)
            assert first.returncode == 0, first.stderr[-3000:]
            assert sorted(k[0] for k in cluster.kfp_objects) == ["pipelines", "pipelineversions"]
            again = _run_pod(hook, config, tmp_path / "upgrade", server.url, "kfp-token", env)
            assert again.returncode == 0, again.stderr[-3000:]
            assert len(cluster.kfp_objects) == 2 and "exists, reused" in again.stderr
            found = _run_pod(check, config, tmp_path / "test", server.url, "kfp-token", env)
            assert found.returncode == 0 and found.stdout.strip() == "pipelineversions-uid-1", found.stderr[-3000:]
            assert not server.calls("POST")  # no run asked for: the REST API was never needed
    finally:
        cluster.stop()


def test_every_value_is_commented() -> None:
    """Each key of values.yaml says what it is: a comment on the line above or at the end of its line."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    bare = [f"{n}: {line.strip()}" for n, line in enumerate(lines, start=1)
            if re.match(r"^\s*[A-Za-z][\w.-]*:", line) and "#" not in line
            and not (n > 1 and lines[n - 2].strip().startswith("#"))]
    assert bare == []


def test_the_checkpoint_volume_keeps_train_cacheable_and_is_made_writable_for_the_task_pods() -> None:
    """A fixed-name PVC for the train steps (a per-run workspace PVC would be in their cache key:
    test_train_cacheable), and a hook Job that mounts it once with the task pods' group as fsGroup:
    KFP sets no fsGroup on its pods (kubeflow/pipelines#3866) and a new block volume's root is
    root-owned 0755, while the kubelet, given an fsGroup, hands the root to that group, group-writable
    (Kubernetes' SetVolumeOwnership, pkg/volume/volume_linux.go)."""
    docs = objects(CASES["gpu-pools"])
    claim = one(docs, "PersistentVolumeClaim", "-checkpoints")
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    platform = yaml.safe_load(one(docs, "ConfigMap")["data"]["platform.yaml"])
    assert platform["checkpoints"] == {"claim": claim["metadata"]["name"], "mount_path": "/spo-checkpoints"}
    job = one(docs, "Job", "-volume-permissions")
    assert job["metadata"]["annotations"]["helm.sh/hook-weight"] == "-5"  # before the upload hook (0) starts a run
    pod = job["spec"]["template"]["spec"]
    assert pod["securityContext"]["fsGroup"] == 1000 and pod["securityContext"]["runAsUser"] == 10001
    assert pod["volumes"] == [{"name": "checkpoints",
                               "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}}]
    train_pool = CASES["gpu-pools"]["pools"][CASES["gpu-pools"]["steps"]["train"]]
    assert pod["nodeSelector"] == train_pool["nodeSelector"]  # a zonal volume is bound where train runs
    # an existing claim is the platform engineer's to prepare: no PVC, no Job, the platform names it
    docs = objects(deep_merge(CASES["gpu-pools"], {"storage": {"checkpoints": {"existingClaim": "ckpt"}}}))
    assert not [d for d in docs if d["metadata"]["name"].endswith(("-checkpoints", "-volume-permissions"))]
    assert yaml.safe_load(one(docs, "ConfigMap")["data"]["platform.yaml"])["checkpoints"]["claim"] == "ckpt"
    docs = objects(deep_merge(CASES["gpu-pools"], {"storage": {"checkpoints": {"create": False}}}))
    assert "checkpoints" not in yaml.safe_load(one(docs, "ConfigMap")["data"]["platform.yaml"])


def test_a_multinode_train_on_a_readwriteonce_checkpoint_volume_is_refused() -> None:
    values = deep_merge(CASES["multinode"], {"storage": {"checkpoints": {"accessModes": ["ReadWriteOnce"]}}})
    with pytest.raises(Exception, match="storage.checkpoints.accessModes.*ReadWriteMany"):
        render(values)
    with pytest.raises(Exception, match="kfp-workspace"):
        render({"storage": {"checkpoints": {"mountPath": "/kfp-workspace/ckpt"}}})
