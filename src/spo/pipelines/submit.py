"""``spo pipeline submit``: compile, upload (or reuse) a pipeline version, start a run, follow it.

Or, instead of a run: only upload (``--no-run``), keep a recurring run on a cron schedule
(``--schedule``: created, kept when identical, replaced when the version, schedule or
parameters changed), or only check that the version this compiles to is on the server
(``--check``, what the Helm chart's ``helm test`` runs: nothing is created).

Re-running with nothing changed must create nothing new (a Helm post-install hook runs this on
every upgrade), so each pipeline version carries the sha256 of its compiled YAML in its
description; a version holding the same hash is reused, any other change uploads a new one.
The first upload of a pipeline creates its default version, named after the pipeline and
carrying the pipeline's description, which is why the hash lives in the description and not
only in the version name.

The bearer token (``$KFP_TOKEN`` or the pod's service-account token file) goes only into the
``Authorization`` header (``kfp.Client(existing_token=...)``, or for a token file kfp's
``ServiceAccountTokenVolumeCredentials``, which re-reads it as the kubelet rotates it; and our
one health check before it). It is scrubbed from every log record and every error message while we talk to the API:
``kfp_server_api.ApiException`` quotes the response's headers and body, and a proxy may copy
the request's ``Authorization`` header into them.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from spo.config import load_config
from spo.errors import InputError, SubmitError
from spo.pipelines.compile import DEFAULT_PLATFORM, compile_pipeline
from spo.pipelines.runtime import check_same_grid

log = logging.getLogger("spo.pipeline")

TOKEN_ENV = "KFP_TOKEN"
SA_TOKEN_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/token"
REQUEST_TIMEOUT_S = 60  # per health check and run poll: a silent network must not outlast --timeout
PAGE_SIZE = 100
MAX_VERSION_PAGES = 50  # 5000 versions searched for a reusable one before uploading anew
MAX_POLL_ERRORS = 5  # consecutive transient errors (5xx, connection) tolerated while following a run
FAILED_STATES = ("FAILED", "CANCELED", "SKIPPED")  # a run's end states other than SUCCEEDED
ACTIONS = ("run", "upload", "schedule", "check")
STORES = ("api", "kubernetes")  # where pipelines are uploaded: the REST API, or Pipeline/PipelineVersion resources


@dataclass(frozen=True)
class Auth:
    """The bearer token, where it came from (for messages: never the token itself) and, for a token
    file, its path: a projected service-account token is rotated by the kubelet, so it is re-read
    for every request of a long ``--wait`` and scrubbed in its current form too."""

    token: str | None
    source: str
    path: Path | None = None

    def tokens(self) -> list[str]:
        current = [self.token] if self.token else []
        if self.path is not None:
            with contextlib.suppress(OSError):
                rotated = self.path.read_text(encoding="utf-8").strip()
                if rotated and rotated not in current:
                    current.append(rotated)
        return current

    def scrub(self, text: object) -> str:
        text = str(text)
        for token in self.tokens():
            text = text.replace(token, "***")
        return text

    def client_kwargs(self) -> dict[str, Any]:
        """``kfp.Client``'s auth: a fixed token, or credentials that re-read the token file."""
        if self.path is not None:
            from kfp.client import ServiceAccountTokenVolumeCredentials

            return {"credentials": ServiceAccountTokenVolumeCredentials(path=str(self.path))}
        return {"existing_token": self.token} if self.token else {}


def read_token(token_env: str = TOKEN_ENV, token_file: str | Path = SA_TOKEN_FILE) -> Auth:
    """``$token_env`` if set, else the token file if present, else none (e.g. a port-forward)."""
    value = os.environ.get(token_env, "").strip()
    if value:
        return Auth(value, f"the token in ${token_env}")
    path = Path(token_file)
    if path.is_file():
        value = path.read_text(encoding="utf-8").strip()
        if value:
            return Auth(value, f"the token in {path}", path)
    return Auth(None, f"no token was sent (set ${token_env} or provide {path})")


def _boolean(raw: str) -> bool:
    value = yaml.safe_load(raw)
    if not isinstance(value, bool):
        raise ValueError(raw)
    return value


def _yaml_of(kind: type) -> Callable[[str], Any]:
    def parse(raw: str) -> Any:
        value = yaml.safe_load(raw)
        if not isinstance(value, kind):
            raise ValueError(raw)
        return value
    return parse


# How a -A value is read for each KFP parameter type: a STRING stays the text as typed (``model=123``
# is the string "123"), the rest must parse as that type, so a typo fails here and not in the run.
_PARSERS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "STRING": ("a string", str), "NUMBER_INTEGER": ("an integer", int), "NUMBER_DOUBLE": ("a number", float),
    "BOOLEAN": ("true or false", _boolean), "LIST": ("a YAML list", _yaml_of(list)),
    "STRUCT": ("a YAML mapping", _yaml_of(dict)),
}


def parse_arguments(items: Sequence[str], parameters: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``knob=value`` items as run parameters, checked against the compiled pipeline's parameters."""
    arguments: dict[str, Any] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise InputError(f"pipeline argument {item!r} is not of the form NAME=VALUE")
        if name not in parameters:
            raise InputError(f"unknown pipeline parameter {name!r} in -A {item!r}; the pipeline's parameters: "
                             f"{', '.join(sorted(parameters))}")
        expected, parse = _PARSERS.get(parameters[name].get("parameterType", ""), ("YAML", yaml.safe_load))
        try:
            arguments[name] = parse(raw)
        except ValueError:
            raise InputError(f"pipeline parameter {name!r} must be {expected}, got {raw!r}") from None
    return arguments


def submit(host: str, *, experiment: str = "spo", params: str | Path = "params.yaml",
           platform: str | Path = DEFAULT_PLATFORM, image: str | None = None, pipeline_name: str | None = None,
           overrides: Sequence[str] = (), arguments: Sequence[str] = (), namespace: str | None = None,
           wait: bool = False, timeout: float = 24 * 3600.0, poll_interval: float = 10.0,
           token_env: str = TOKEN_ENV, token_file: str | Path = SA_TOKEN_FILE, action: str = "run",
           schedule: str | None = None, schedule_name: str | None = None, store: str = "api",
           workload_namespace: str | None = None, kfp_namespace: str | None = None,
           kubernetes_api: Any | None = None, cluster: Any | None = None, allow_large_grid: bool = False,
           clock: Callable[[], float] = time.monotonic,
           sleep: Callable[[float], None] = time.sleep) -> str:
    """Compile, upload or reuse the version, start a run in ``experiment``; print its link, return its id.

    ``action``: ``run`` (the default), ``upload`` (no run; returns the version id), ``schedule``
    (a recurring run on the cron ``schedule``, named ``schedule_name``; returns its id) or
    ``check`` (nothing created: raises :class:`SubmitError` unless the version exists).
    ``store``: ``api`` uploads through the REST API; ``kubernetes`` creates ``Pipeline`` and
    ``PipelineVersion`` resources instead (spo.pipelines.k8s_store; ``kubernetes_api``: a
    ``CustomObjectsApi``, default the pod's), and runs still go through the REST API.

    ``overrides`` (``section.key=value``) go into the ``overrides`` list parameter (after any
    ``-A overrides=[...]``) and are checked against ``params`` first (one that changes the grid,
    compiled in, is refused: edit the params file); a grid over ``grid``'s limits is refused
    unless ``allow_large_grid``; ``arguments``
    (``knob=value``) set pipeline parameters. ``namespace`` is the profile namespace of a
    multi-user KFP: the pipeline, the experiment and the run go there; ``workload_namespace`` and
    ``kfp_namespace`` are checked against where KFP will run the pods (:func:`check_namespaces`).
    ``cluster`` (with ``check``: a ``kubernetes`` ``ApiClient``) also checks, in
    ``workload_namespace`` (else ``namespace``), what the platform file needs there
    (spo.cluster.preflight): the PVCs it names, Kubeflow Trainer for a multi-node train.
    ``wait`` follows the run
    to its end and raises :class:`SubmitError` unless it succeeds within ``timeout`` seconds.
    ``clock`` and ``sleep`` measure that timeout and wait between polls; they are parameters so
    that tests can inject a fake clock instead of waiting (and depending on the machine's speed).
    """
    host = host.rstrip("/")
    if not host.startswith(("http://", "https://")):
        raise InputError(f"--host {host!r} must start with http:// or https://")
    if timeout <= 0 or poll_interval <= 0:
        raise InputError("the timeout and the poll interval must be positive")
    if action not in ACTIONS:
        raise InputError(f"action {action!r}: one of {list(ACTIONS)}")
    if store not in STORES:
        raise InputError(f"--store {store!r}: one of {list(STORES)}")
    if (action == "schedule") != bool(schedule):
        raise InputError("a schedule (a cron expression) goes with the schedule action, and only with it")
    if schedule:
        check_cron(schedule)
    if wait and action != "run":
        raise InputError("--wait follows a run: it goes with starting one")
    if cluster is not None and (action != "check" or not (workload_namespace or namespace)):
        raise InputError("--cluster goes with --check, and needs the namespace the run's pods use "
                         "(--workload-namespace, or --namespace on multi-user KFP)")
    auth = read_token(token_env, token_file)
    with tempfile.TemporaryDirectory(prefix="spo-submit-") as tmp:
        package = compile_pipeline(Path(tmp) / "pipeline.yaml", params=params, platform=platform, image=image,
                                   allow_large_grid=allow_large_grid)
        digest = hashlib.sha256(package.read_bytes()).hexdigest()
        spec = next(yaml.safe_load_all(package.read_text(encoding="utf-8")))
        run_arguments = parse_arguments(arguments, spec["root"]["inputDefinitions"]["parameters"])
        if overrides:
            if "params" not in run_arguments:  # a whole params text given at run time is checked by the run itself
                check_same_grid(load_config(params, list(overrides)), Path(params).read_text(encoding="utf-8"))
            run_arguments["overrides"] = [*run_arguments.get("overrides", []), *overrides]
        name = pipeline_name or spec["pipelineInfo"]["name"]
        done: tuple[str, str] | None = None  # what an action other than run returns and prints
        with _scrubbed_logs(auth), _kfp_prints_to_log(auth):
            with _api_step(auth, host, "connecting"):
                multi_user = _healthz(host, auth).multi_user
            check_namespaces(host, bool(multi_user), namespace, workload_namespace, kfp_namespace)
            if store == "kubernetes":
                pipeline_id, version_id = _kubernetes_store(Path(tmp), action, params, platform, image, name, digest,
                                                            namespace, kubernetes_api)
                if action in ("check", "upload"):
                    done = version_id, version_id
            if done is None:
                with _api_step(auth, host, "connecting"):
                    client = _connect(host, auth, namespace)
            if action == "check" and store == "api":
                with _api_step(auth, host, f"looking up pipeline {name!r}"):
                    version_id = _check_version(client, name, digest, namespace)
                    done = version_id, version_id
            elif store == "api":
                with _api_step(auth, host, f"uploading pipeline {name!r}"):
                    pipeline_id, version_id = _pipeline_version(client, package, name, digest, namespace)
            if action == "upload":
                done = version_id, version_id
            if action == "schedule":
                with _api_step(auth, host, f"scheduling pipeline {name!r} in experiment {experiment!r}"):
                    experiment_id = client.create_experiment(experiment, namespace=namespace).experiment_id
                    job_id = _recurring_run(client, experiment_id, schedule_name or f"{name}-schedule", str(schedule),
                                            pipeline_id, version_id, run_arguments)
                    done = job_id, f"{host}/#/recurringrun/details/{job_id}"
            if done is None:
                with _api_step(auth, host, f"starting a run in experiment {experiment!r}"):
                    experiment_id = client.create_experiment(experiment, namespace=namespace).experiment_id
                    run = client.run_pipeline(experiment_id, f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}",
                                              params=run_arguments, pipeline_id=pipeline_id, version_id=version_id)
    if cluster is not None:
        from spo.cluster.preflight import cluster_findings
        from spo.kube.platform import load_platform

        where = str(workload_namespace or namespace)
        findings = cluster_findings(load_platform(platform, image), where, cluster)
        if findings:
            raise SubmitError(f"the cluster is not ready for this platform file in namespace {where!r}:\n  - "
                              + "\n  - ".join(findings))
        log.info("pipeline submit --check: namespace %s has what the platform file names", where)
    if done is not None:
        print(done[1], flush=True)
        return done[0]
    link = f"{host}/#/runs/details/{run.run_id}"
    log.info("pipeline submit: run %s of %s version %s with %s", run.run_id, name, version_id,
             json.dumps(run_arguments) if run_arguments else "the compiled defaults")
    print(link, flush=True)
    if wait:
        with _scrubbed_logs(auth), _api_step(auth, host, f"following run {run.run_id}"):
            _follow(client, host, run.run_id, auth, timeout, poll_interval, clock=clock, sleep=sleep)
    return run.run_id


def check_cron(cron: str) -> None:
    """Refuse what KFP would misread. Its ScheduledWorkflow controller parses cron with robfig/cron's
    ``Parse`` (backend/src/crd/controller/scheduledworkflow/util/cron_schedule.go), whose fields are
    ``second minute hour day-of-month month [day-of-week]``: a 5-field crontab line is accepted and
    read with seconds first, so ``0 3 * * *`` would run every hour at :03, not daily at 03:00. Only
    6 fields are taken; a 5-field line is refused with its 6-field meaning suggested."""
    fields = cron.split()
    if len(fields) == 6:
        return
    if len(fields) == 5:
        raise InputError(f"--schedule {cron!r}: KFP reads cron with seconds first (6 fields: second minute hour "
                         f"day-of-month month day-of-week), so these 5 fields would mean second {fields[0]}, minute "
                         f"{fields[1]}, every hour {fields[2]}, ...; for the crontab meaning write "
                         f"'0 {cron.strip()}'")
    raise InputError(f"--schedule {cron!r}: a cron expression of 6 fields, seconds first, e.g. '0 0 3 * * *' "
                     "(daily at 03:00 UTC)")


def check_namespaces(host: str, multi_user: bool, namespace: str | None, workload_namespace: str | None,
                     kfp_namespace: str | None) -> None:
    """Refuse a namespace setting under which the run's pods would not find its volumes and Secrets.

    Single-user KFP ignores namespaces: its API server replaces every resource's namespace with ""
    (backend/src/apiserver/resource/resource_manager.go, ``ReplaceNamespace``, kubeflow/pipelines at
    tag 2.17.0) and runs every pipeline pod in its own namespace. Multi-user KFP runs them in the
    profile namespace (``namespace``). ``workload_namespace`` is where the run's data PVC, Secrets
    and launcher Role are (the chart's release namespace); ``kfp_namespace`` is where single-user
    KFP runs (the chart's ``networkPolicy.kfpNamespace``).
    """
    if multi_user and not namespace:
        raise SubmitError(f"the KFP at {host} is multi-user: pass --namespace (your profile's namespace; the chart's "
                          "kfp.namespace)")
    if not multi_user and namespace:
        raise SubmitError(f"the KFP at {host} is single-user: it ignores --namespace {namespace!r} and runs every "
                          "pipeline pod in its own namespace; drop --namespace (the chart's kfp.namespace: \"\") and "
                          "install the release in KFP's namespace")
    if not workload_namespace:
        return
    pods = namespace if multi_user else kfp_namespace
    if pods and pods != workload_namespace:
        mode = "multi-user: the profile namespace" if multi_user else "single-user: KFP's own namespace"
        raise SubmitError(f"the pipeline's pods would run in {pods!r} (KFP is {mode}), but the run's data volume, "
                          f"Secrets and TrainJob launcher Role are in {workload_namespace!r}: prepare would stay "
                          f"Pending and secret-using steps would not start. Install the release in {pods!r} "
                          "(docs/operations.md, \"Before you install\")")


def _healthz(host: str, auth: Auth) -> Any:
    """KFP's ``/apis/v2beta1/healthz`` (``multi_user``, the version), asked once, with our timeout."""
    import kfp_server_api

    config = kfp_server_api.Configuration(host=host)
    if auth.token:
        config.api_key["authorization"] = auth.token
        config.api_key_prefix["authorization"] = "Bearer"
    with kfp_server_api.ApiClient(config) as api:
        return kfp_server_api.HealthzServiceApi(api).healthz_service_get_healthz(_request_timeout=REQUEST_TIMEOUT_S)


def _connect(host: str, auth: Auth, namespace: str | None) -> Any:
    """A ``kfp.Client`` for ``host``, after the health check of :func:`submit`.

    ``kfp.Client()`` itself retries the health check five times 5 s apart, logging a traceback
    each time, so a wrong host or a refused token would surface only after 25 s; and on a
    multi-user KFP without a namespace it guesses one from the pod and writes it to
    ``~/.config/kfp/context.json`` (:func:`check_namespaces` refuses that case first). Passing
    ``host`` keeps it from kube-config discovery.
    """
    import kfp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "only works with KFP v2.0.0-beta.2 and later", each time
        return kfp.Client(host=host, **auth.client_kwargs(), **({"namespace": namespace} if namespace else {}))


def _pipeline_version(client: Any, package: Path, name: str, digest: str, namespace: str | None) -> tuple[str, str]:
    """The (pipeline id, version id) holding this compiled YAML: found, or uploaded.

    A 409 means a concurrent submit uploaded it first: look again (bounded).
    """
    import kfp_server_api

    marker = f"sha256:{digest}"
    description = f"compiled pipeline YAML {marker}"
    uploaded = False
    for _ in range(3):
        pipeline_id = _find_pipeline(client, name, namespace)
        if pipeline_id:
            version_id = _find_version(client, pipeline_id, marker)
            if version_id:
                log.info("pipeline %s: %s version %s (%s)", name, "its first" if uploaded else "reusing", version_id,
                         marker)
                return pipeline_id, version_id
        try:
            if pipeline_id is None:
                log.info("pipeline %s: not on the server, uploading it (%s)", name, marker)
                client.upload_pipeline(str(package), pipeline_name=name, description=description, namespace=namespace)
                uploaded = True
                continue  # its default version is found by the marker on the next pass
            version = client.upload_pipeline_version(str(package), f"{name}-{digest[:12]}", pipeline_id=pipeline_id,
                                                     description=description)
            log.info("pipeline %s: uploaded version %s (%s)", name, version.pipeline_version_id, marker)
            return pipeline_id, version.pipeline_version_id
        except kfp_server_api.ApiException as err:
            if err.status != 409:
                raise
    raise SubmitError(f"pipeline {name!r}: no version holding {marker} after uploading it (a name clash?)")


def _kubernetes_store(tmp: Path, action: str, params: str | Path, platform: str | Path, image: str | None, name: str,
                      digest: str, namespace: str | None, api: Any | None) -> tuple[str, str]:
    """(pipeline id, version id) of the Pipeline/PipelineVersion resources of this content:
    looked up (``check``: :class:`SubmitError` when absent), else created or reused."""
    from spo.cluster.launcher import current_namespace, custom_objects_api
    from spo.pipelines import k8s_store

    namespace = namespace or current_namespace()
    api = api if api is not None else custom_objects_api()
    if action == "check":
        version_id = k8s_store.get_version(pipeline=name, digest=digest, namespace=namespace, api=api)
        if not version_id:
            raise SubmitError(f"PipelineVersion {namespace}/{k8s_store.version_name(name, digest)} "
                              "is not on the cluster: these values and this image were never uploaded "
                              "(did the upload hook run and succeed?)")
        return "", version_id
    manifests = compile_pipeline(tmp / "manifests.yaml", params=params, platform=platform, image=image,
                                 kubernetes_manifests=True, namespace=namespace, pipeline_name=name,
                                 version=k8s_store.version_name(name, digest))
    return k8s_store.put_version(manifests, pipeline=name, digest=digest, namespace=namespace, api=api)


def _check_version(client: Any, name: str, digest: str, namespace: str | None) -> str:
    """The id of the version holding this compiled YAML; :class:`SubmitError` when there is none."""
    marker = f"sha256:{digest}"
    pipeline_id = _find_pipeline(client, name, namespace)
    version_id = _find_version(client, pipeline_id, marker) if pipeline_id else None
    if not version_id:
        raise SubmitError(f"pipeline {name!r}: no version holding {marker} on the server"
                          f"{'' if pipeline_id else ' (no such pipeline)'}: these values and this image were never "
                          "uploaded (did the upload hook run and succeed?)")
    log.info("pipeline %s: version %s holds %s", name, version_id, marker)
    return version_id


def _recurring_run(client: Any, experiment_id: str, name: str, cron: str, pipeline_id: str, version_id: str,
                   arguments: Mapping[str, Any]) -> str:
    """The recurring run ``name`` of this version, schedule and parameters: kept when one exists
    (rerunning creates nothing new), else created, replacing one of that name that differs."""
    name_filter = json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})
    found = client.list_recurring_runs(experiment_id=experiment_id, filter=name_filter,
                                       page_size=10).recurring_runs or []
    for job in found:
        same = (job.pipeline_version_reference is not None
                and job.pipeline_version_reference.pipeline_version_id == version_id
                and job.trigger is not None and job.trigger.cron_schedule is not None
                and job.trigger.cron_schedule.cron == cron
                and ((job.runtime_config.parameters if job.runtime_config else None) or {}) == dict(arguments))
        if same:
            log.info("recurring run %s: unchanged (%s, version %s), kept", job.recurring_run_id, cron, version_id)
            return str(job.recurring_run_id)
    for job in found:
        log.info("recurring run %s (%s): replaced by this version, schedule and parameters", job.recurring_run_id, name)
        client.delete_recurring_run(job.recurring_run_id)
    job = client.create_recurring_run(experiment_id, name, cron_expression=cron, pipeline_id=pipeline_id,
                                      version_id=version_id, params=dict(arguments), max_concurrency=1,
                                      no_catchup=True)
    log.info("recurring run %s: %s on %s, version %s", job.recurring_run_id, name, cron, version_id)
    return str(job.recurring_run_id)


def _find_pipeline(client: Any, name: str, namespace: str | None) -> str | None:
    name_filter = json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})
    found = client.list_pipelines(filter=name_filter, page_size=2, namespace=namespace).pipelines or []
    if len(found) > 1:
        raise SubmitError(f"{len(found)} pipelines are named {name!r}; pass --pipeline-name to pick a unique name")
    return found[0].pipeline_id if found else None


def _find_version(client: Any, pipeline_id: str, marker: str) -> str | None:
    page_token = ""
    for _ in range(MAX_VERSION_PAGES):
        page = client.list_pipeline_versions(pipeline_id, page_token=page_token, page_size=PAGE_SIZE,
                                             sort_by="created_at desc")
        for version in page.pipeline_versions or []:
            if marker in (version.description or ""):
                return version.pipeline_version_id
        page_token = page.next_page_token
        if not page_token:
            return None
    log.warning("pipeline %s: more than %d versions, searched the newest only", pipeline_id,
                PAGE_SIZE * MAX_VERSION_PAGES)
    return None


def _follow(client: Any, host: str, run_id: str, auth: Auth, timeout: float, poll_interval: float, *,
            clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
    """Poll the run until it ends (logging each new state); raise unless it SUCCEEDED in time.

    Not ``Client.wait_for_run_completion``: it never returns on CANCELED, logs no states, has
    no request timeout and, on a 401, asks Google Cloud for a new token. ``clock`` and ``sleep``
    are injectable so that tests can follow a run on a fake clock.
    """
    import kfp_server_api
    import urllib3

    link = f"{host}/#/runs/details/{run_id}"
    deadline = clock() + timeout
    state, errors = None, 0
    while True:
        try:
            run = client.runs.run_service_get_run(run_id=run_id, _request_timeout=REQUEST_TIMEOUT_S)
        except (kfp_server_api.ApiException, urllib3.exceptions.HTTPError) as err:
            errors += 1
            transient = not isinstance(err, kfp_server_api.ApiException) or err.status >= 500
            if not transient or errors > MAX_POLL_ERRORS:
                raise
            log.warning("run %s: %s (retry %d of %d)", run_id, _describe(err, host, auth), errors, MAX_POLL_ERRORS)
        else:
            errors = 0
            if run.state != state:
                state = run.state
                log.info("run %s: %s", run_id, state)
            if state == "SUCCEEDED":
                return
            if state in FAILED_STATES:
                raise SubmitError(auth.scrub(_failure(run, link)))
        remaining = deadline - clock()
        if remaining <= 0:
            raise SubmitError(f"run {run_id} still {state} after {timeout:g} s (it goes on running): {link}")
        sleep(min(poll_interval, remaining))


def _failure(run: Any, link: str) -> str:
    message = run.error.message if run.error and run.error.message else "no error message"
    tasks = [t.display_name for t in (run.run_details.task_details or [])
             if t.state in ("FAILED", "CANCELED")] if run.run_details else []
    failed = f" (failed: {', '.join(tasks)})" if tasks else ""
    return f"run {run.run_id} ended {run.state}: {message}{failed}: {link}"


@contextlib.contextmanager
def _api_step(auth: Auth, host: str, what: str) -> Iterator[None]:
    """Turn the API's and the transport's errors into a :class:`SubmitError` naming the step, token scrubbed.

    ``from None``: the original exception, which may quote the token, is not chained.
    """
    import kfp_server_api
    import urllib3

    try:
        yield
    except SubmitError:
        raise
    except (kfp_server_api.ApiException, urllib3.exceptions.HTTPError, OSError, ValueError) as err:
        raise SubmitError(f"{what}: {_describe(err, host, auth)}") from None


def _describe(err: Exception, host: str, auth: Auth) -> str:
    import kfp_server_api
    import urllib3

    if isinstance(err, (OSError, urllib3.exceptions.HTTPError)):
        return auth.scrub(f"cannot reach the KFP API at {host}: {err}")
    if not isinstance(err, kfp_server_api.ApiException):
        return auth.scrub(err)
    body = err.body.decode("utf-8", "replace") if isinstance(err.body, bytes) else str(err.body or "")
    with contextlib.suppress(ValueError, AttributeError):
        body = json.loads(body).get("message") or body
    status = f"HTTP {err.status} {err.reason}"
    if err.status in (401, 403):
        return auth.scrub(f"the KFP API at {host} refused the credentials ({status}); {auth.source}: {body[:300]}")
    return auth.scrub(f"{status}: {body[:300]}")


class _Scrub(logging.Filter):
    """Replaces the token in a record's message and traceback (kfp logs ApiExceptions with their bodies)."""

    def __init__(self, auth: Auth) -> None:
        super().__init__()
        self.auth = auth

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.auth.token and self.auth.token in message:
            record.msg, record.args = self.auth.scrub(message), ()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.auth.scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = self.auth.scrub(record.stack_info)
        return True


@contextlib.contextmanager
def _scrubbed_logs(auth: Auth) -> Iterator[None]:
    """Scrub on the root handlers (and the no-handler fallback), where every propagating logger's records go."""
    handlers = [*logging.getLogger().handlers, logging.lastResort]
    scrub = _Scrub(auth)
    for handler in handlers:
        if handler is not None:
            handler.addFilter(scrub)
    try:
        yield
    finally:
        for handler in handlers:
            if handler is not None:
                handler.removeFilter(scrub)


@contextlib.contextmanager
def _kfp_prints_to_log(auth: Auth) -> Iterator[None]:
    """kfp.Client prints an 'Experiment/Pipeline/Run details' link per call; keep stdout for the run link."""
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            yield
    finally:
        for line in printed.getvalue().splitlines():
            log.debug("kfp: %s", auth.scrub(line))
