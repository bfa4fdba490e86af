"""Create a TrainJob, follow it to the end, and never leave it running when we stop following.

:func:`launch` is what the pipeline's launcher task (and an operator at a terminal) runs: it
creates the TrainJob through the official ``kubernetes`` client (in-cluster config, else the
kubeconfig), polls its ``status`` and logs every change with a UTC timestamp — conditions with
their reason and message, the child jobs' counts — and the ``kubectl`` commands that show the
pods and their logs, because that is what someone debugging a failed 16-GPU run at night has.

* ``Complete``: returns the final object.
* ``Failed``: raises :class:`TrainJobFailed` carrying the job's own reason and message; the job
  is kept for inspection — its events, and its pods' logs while they exist (``kubectl delete``
  it when done).
* The deadline passes: deletes the job (its pods with it) and raises :class:`TrainJobTimeout`.
* Cancelled (``KeyboardInterrupt``, or SIGTERM — what KFP sends a run's pods when the run is
  terminated): deletes the job, then re-raises.
* API errors: 429/5xx and connection errors are retried a bounded number of times, doubling the
  wait; anything else raises :class:`TrainJobApiError` saying what the status means here
  (RBAC, Trainer not installed, the job rejected...).
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from spo.errors import TrainJobApiError, TrainJobError, TrainJobFailed, TrainJobTimeout

__all__ = ["Terminated", "current_namespace", "custom_objects_api", "launch", "launcher_pod"]

GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
TRANSIENT = frozenset({429, 500, 502, 503, 504})
HEARTBEAT_SECONDS = 600.0  # a line even when nothing changes: the launcher is alive and still following
MAX_RETRY_WAIT = 30.0
NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
RUN_ID_LABEL = "pipeline/runid"  # KFP's label on every pod of a run

_log = logging.getLogger("spo.trainjob")


class Terminated(BaseException):
    """SIGTERM as an exception, so the cleanup in :func:`launch` runs (a BaseException, like
    KeyboardInterrupt, so no ``except Exception`` on the way swallows it)."""


def custom_objects_api() -> Any:
    """A ``CustomObjectsApi`` for the pod's service account, else for the kubeconfig."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except (config.ConfigException, OSError) as err:
            raise TrainJobApiError(f"no Kubernetes credentials: not in a pod, and no usable kubeconfig ({err})",
                                   0) from None
    return client.CustomObjectsApi()


def current_namespace() -> str:
    """The namespace of the pod we run in (where the run's workspace PVC is, so where the job goes)."""
    try:
        with open(NAMESPACE_FILE, encoding="utf-8") as stream:
            return stream.read().strip()
    except OSError as err:
        raise TrainJobError(f"{NAMESPACE_FILE}: cannot read the pod's namespace ({err.strerror}); "
                            "pass it explicitly") from None


@dataclass(frozen=True)
class LauncherPod:
    """The KFP task pod this launcher runs in: its name and UID (the TrainJob's owner) and its run id."""

    name: str
    uid: str | None
    run_id: str | None


def launcher_pod(api: Any, namespace: str) -> LauncherPod | None:
    """The pod named by ``KFP_POD_NAME`` (which KFP sets in every task's container), read from the
    API: its ``pipeline/runid`` label and its UID. The run id is read here, not passed in, because a
    run id among a task's inputs would make its cache key new for every run. None (with a warning)
    when it cannot be read, e.g. the role lacks ``get`` on pods."""
    import os

    from kubernetes import client
    from kubernetes.client.rest import ApiException

    pod = os.environ.get("KFP_POD_NAME")
    if not pod:
        return None
    try:
        metadata = client.CoreV1Api(api.api_client).read_namespaced_pod(pod, namespace).metadata
    except ApiException as err:
        _log.warning("cannot read pod %s/%s for its run id (HTTP %s %s): the TrainJob is labelled without it and "
                     "has no owner; grant 'get' on pods to the pipeline's service account", namespace, pod,
                     err.status, err.reason)
        return None
    return LauncherPod(name=pod, uid=metadata.uid, run_id=(metadata.labels or {}).get(RUN_ID_LABEL))


def launch(manifest: Mapping[str, Any], *, namespace: str, api: Any | None = None, poll_seconds: float = 15.0,
           deadline_seconds: float | None = None, log: Callable[[str], None] | None = None, attempts: int = 5,
           request_timeout: float = 60.0, clock: Callable[[], float] = time.monotonic,
           sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Create the TrainJob ``manifest`` in ``namespace`` and follow it until it completes (see the module doc).

    ``deadline_seconds`` counts from the call; ``attempts`` bounds the tries of each API call
    (transient errors only); ``log`` gets one line per event (default: the ``spo.trainjob`` logger).
    ``clock`` and ``sleep`` measure the deadline and the heartbeat and wait between polls and
    retries; they are parameters so that tests can inject a fake clock instead of waiting.
    """
    metadata = manifest.get("metadata") or {}
    name = metadata.get("name")
    if not name:
        raise ValueError("the TrainJob has no metadata.name")
    if metadata.get("namespace") not in (None, namespace):
        raise ValueError(f"TrainJob {name} names namespace {metadata['namespace']!r} but is launched in {namespace!r}")
    where = f"TrainJob {namespace}/{name}"
    write = log or _log.info

    def say(text: str) -> None:
        write(f"{_now()} {where}: {text}")

    client = _Client(api or custom_objects_api(), namespace, name, where, attempts, request_timeout, poll_seconds, say,
                     sleep)
    body = {**manifest, "metadata": {**metadata, "namespace": namespace}}
    hints = _hints(namespace, name, int((manifest.get("spec", {}).get("trainer") or {}).get("numNodes") or 1))
    started = clock()
    with _sigterm_raises():
        try:
            client.create(body)
            say(f"created ({_shape(manifest)}); follow it with:\n{hints}")
            return _follow(client, say, hints, started, poll_seconds, deadline_seconds, clock, sleep)
        except (KeyboardInterrupt, Terminated) as stop:
            say(f"cancelled ({'SIGTERM' if isinstance(stop, Terminated) else 'interrupted'}); deleting the job so "
                "its pods do not keep running")
            client.delete_quietly()
            raise


def _follow(client: _Client, say: Callable[[str], None], hints: str, started: float, poll_seconds: float,
            deadline_seconds: float | None, clock: Callable[[], float],
            sleep: Callable[[float], None]) -> dict[str, Any]:
    last: tuple[Any, ...] | None = None
    last_said = clock()
    while True:
        job = client.get()
        state = _state(job)
        now = clock()
        if state != last:
            say(f"status after {_elapsed(now - started)}: {_describe(state)}")
            last, last_said = state, now
        elif now - last_said >= HEARTBEAT_SECONDS:
            say(f"still running after {_elapsed(now - started)}, no change since {_elapsed(now - last_said)}")
            last_said = now
        complete, failed = _condition(job, "Complete"), _condition(job, "Failed")
        if complete:
            say(f"complete after {_elapsed(now - started)}: {complete.get('message') or complete.get('reason') or ''}")
            return job
        if failed:
            reason, message = str(failed.get("reason") or "?"), str(failed.get("message") or "")
            raise TrainJobFailed(f"{client.where} failed after {_elapsed(now - started)}: {reason}: {message}\n"
                                 f"  last status: {_describe(state)}\n"
                                 f"  the TrainJob is kept for inspection; look with:\n{hints}\n"
                                 f"  then: kubectl delete trainjob -n {client.namespace} {client.name}",
                                 reason, message)
        if deadline_seconds is not None and now - started >= deadline_seconds:
            say(f"not finished after the launcher's deadline of {_elapsed(deadline_seconds)}; deleting it")
            client.delete()
            raise TrainJobTimeout(f"{client.where} did not finish within {_elapsed(deadline_seconds)} and was deleted "
                                  f"(with its pods)\n  last status: {_describe(state)}")
        sleep(poll_seconds)


class _Client:
    """The three calls, each with bounded retries of transient failures and errors that say what they mean."""

    def __init__(self, api: Any, namespace: str, name: str, where: str, attempts: int, timeout: float,
                 pause: float, say: Callable[[str], None], sleep: Callable[[float], None] = time.sleep) -> None:
        self.api, self.namespace, self.name, self.where = api, namespace, name, where
        self.attempts, self.timeout, self.pause, self.say = max(1, attempts), timeout, pause, say
        self.sleep = sleep  # the wait before a retry: injectable, as launch's

    def create(self, body: Mapping[str, Any]) -> None:
        # Strict: the API server rejects (instead of pruning) a field its CRD does not know
        self._call("create", self.api.create_namespaced_custom_object, body=body, field_validation="Strict")

    def get(self) -> dict[str, Any]:
        return self._call("get", self.api.get_namespaced_custom_object, name=self.name)

    def delete(self) -> None:
        # Foreground: the TrainJob stays visible (Terminating) until its JobSet and pods are gone
        self._call("delete", self.api.delete_namespaced_custom_object, name=self.name, propagation_policy="Foreground")

    def delete_quietly(self) -> None:
        """Delete during a cancel: a failure is logged (with the command to do it by hand), not raised
        over the cancel that is already propagating."""
        try:
            self.delete()
            self.say("deleted")
        except TrainJobError as err:
            self.say(f"could NOT delete it ({err}); delete it by hand: kubectl delete trainjob -n {self.namespace} "
                     f"{self.name}")

    def _call(self, action: str, method: Callable[..., Any], **kwargs: Any) -> Any:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        attempt = 0
        while True:
            attempt += 1
            try:
                return method(GROUP, VERSION, self.namespace, PLURAL, _request_timeout=self.timeout, **kwargs)
            except ApiException as err:
                if action == "delete" and err.status == 404:
                    return None  # already gone: what deleting wanted
                if action == "create" and err.status == 409 and attempt > 1:
                    return None  # our earlier try went through before its answer was lost
                if err.status not in TRANSIENT or attempt >= self.attempts:
                    raise TrainJobApiError(_api_message(self.where, self.namespace, action, err, attempt),
                                           int(err.status or 0)) from None
                problem = f"HTTP {err.status} {err.reason}"
            except (HTTPError, OSError) as err:
                if attempt >= self.attempts:
                    raise TrainJobApiError(f"{self.where}: {action}: cannot reach the Kubernetes API after "
                                           f"{attempt} tries: {err}", 0) from None
                problem = f"{type(err).__name__}: {err}"
            wait = min(self.pause * 2 ** (attempt - 1), MAX_RETRY_WAIT)
            self.say(f"{action}: {problem}; try {attempt + 1}/{self.attempts} in {wait:.1f} s")
            self.sleep(wait)


def _api_message(where: str, namespace: str, action: str, err: Any, tries: int) -> str:
    """The API server's own message, and what its status means for a TrainJob."""
    detail = ""
    if err.body:
        text = err.body.decode("utf-8", "replace") if isinstance(err.body, bytes) else str(err.body)
        try:
            detail = str(json.loads(text).get("message") or text)
        except (ValueError, AttributeError):
            detail = text
    meaning = {
        401: "the API server did not accept our credentials",
        403: f"the pod's service account may not {action} trainjobs.trainer.kubeflow.org in namespace {namespace}: "
             "grant it create/get/delete (Kubeflow's kubeflow-edit role has them when Trainer's kubeflow-platform "
             "overlay is installed)",
        404: "the TrainJob API is not served: is Kubeflow Trainer v2 (>= v2.2) installed?" if action == "create"
             else "the job is gone: deleted by someone else?",
        409: "a TrainJob of this name already exists",
        422: "the API server (the TrainJob CRD or Trainer's webhook) rejected the job",
    }.get(int(err.status or 0), "")
    after = f" after {tries} tries" if tries > 1 else ""
    return (f"{where}: {action} failed{after}: HTTP {err.status} {err.reason}"
            + (f": {detail[:1000]}" if detail else "")
            + (f"\n  {meaning}" if meaning else ""))


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` in the main thread, once: a second one during the cleanup
    is ignored so the delete is not cut short. (Signals reach the main thread only; elsewhere
    this does nothing.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = False

    def handler(signum: int, frame: Any) -> None:
        nonlocal fired
        if not fired:
            fired = True
            raise Terminated(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _condition(job: Mapping[str, Any], kind: str) -> dict[str, Any] | None:
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") == kind and condition.get("status") == "True":
            return condition
    return None


def _state(job: Mapping[str, Any]) -> tuple[Any, ...]:
    """What is worth a line when it changes: the conditions, the child jobs' counts, the progress."""
    status = job.get("status") or {}
    conditions = tuple((c.get("type"), c.get("status"), c.get("reason"), c.get("message"), c.get("lastTransitionTime"))
                       for c in status.get("conditions") or [])
    jobs = tuple((j.get("name"), *(j.get(k, 0) for k in ("active", "ready", "succeeded", "failed", "suspended")))
                 for j in status.get("jobsStatus") or [])
    progress = (status.get("trainerStatus") or {}).get("progressPercentage")
    return conditions, jobs, progress


def _describe(state: tuple[Any, ...]) -> str:
    conditions, jobs, progress = state
    parts = [f"{kind}={value} ({reason}: {message}; since {since})"
             for kind, value, reason, message, since in conditions]
    parts += [f"jobs {name}: {active} active, {ready} ready, {succeeded} succeeded, {failed} failed, "
              f"{suspended} suspended"
              for name, active, ready, succeeded, failed, suspended in jobs]
    if progress is not None:
        parts.append(f"progress {progress}%")
    return "; ".join(parts) or "no status yet (is the Trainer controller running? kubectl get pods -n kubeflow-system)"


def _hints(namespace: str, name: str, nodes: int) -> str:
    pods = f"jobset.sigs.k8s.io/jobset-name={name}"
    return (f"    kubectl get trainjob -n {namespace} {name} -o yaml\n"
            f"    kubectl get pods -n {namespace} -l {pods} -o wide\n"
            f"    kubectl logs -n {namespace} -l {pods} -c node --prefix --tail=200 "
            f"--max-log-requests={max(nodes, 5)}\n"
            f"    kubectl describe trainjob -n {namespace} {name}   # events: scheduling, image pulls, webhook")


def _shape(manifest: Mapping[str, Any]) -> str:
    spec = manifest.get("spec") or {}
    trainer = spec.get("trainer") or {}
    limits = (trainer.get("resourcesPerNode") or {}).get("limits") or {}
    accelerators = ", ".join(f"{count} {kind}" for kind, count in limits.items() if kind not in ("cpu", "memory"))
    return (f"{trainer.get('numNodes', 1)} node(s) x {trainer.get('numProcPerNode', 'auto')} process(es)"
            + (f", {accelerators} per node" if accelerators else "")
            + f", runtime {(spec.get('runtimeRef') or {}).get('name')}")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _elapsed(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m{rest % 60:02d}s" if hours else f"{rest // 60}m{rest % 60:02d}s"
