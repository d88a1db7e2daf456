"""The Kubernetes API calls of the k8s target: create, read, list and delete RayJobs, read the
submitter pod's log; or, with no kubeconfig, write the manifest and hand back `kubectl apply`.

`kubernetes` is an extra (`pip install 'ftlaunch[k8s]'`), imported only when a call needs it.
"""

from __future__ import annotations

import json
import os
import shlex
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

from launcher.errors import ClusterError, MissingExtraError, SubmissionError
from launcher.k8s.constants import APP_LABEL, APP_NAME, GROUP, RAYJOBS, VERSION
from launcher.k8s.render import dump_manifest

TERMINAL_JOB = ("STOPPED", "SUCCEEDED", "FAILED")


class NotFound(SubmissionError):
    """The API answered 404 for a named object (a deleted RayJob, a pod already gone)."""

TERMINAL_DEPLOYMENT = ("Complete", "Failed", "ValidationFailed")


def _kubernetes():
    try:
        import kubernetes
    except ImportError:
        raise MissingExtraError("kubernetes", "k8s") from None
    return kubernetes


def submit_rayjob(
    manifest: dict,
    *,
    kubeconfig: Optional[str] = None,
    api_client: Any = None,
    out_dir: Optional[str] = None,
) -> dict:
    """Create the RayJob when a cluster is configured; otherwise write it to a file.

    Returns {"mode": "created", "name", "namespace", "object"} or {"mode": "file", "path", "command"}.
    """
    namespace = manifest.get("metadata", {}).get("namespace", "default")
    name = manifest.get("metadata", {}).get("name", "")
    if api_client is None and (kubeconfig or _default_kubeconfig()) is None:
        return write_manifest(manifest, out_dir)
    api = _kubernetes().client.CustomObjectsApi(api_client or api_client_from(kubeconfig))
    created = _call(
        lambda: api.create_namespaced_custom_object(GROUP, VERSION, namespace, RAYJOBS, manifest),
        f"creating RayJob {namespace}/{name}",
        conflict=f"RayJob {namespace}/{name} already exists; delete it "
                 f"(kubectl delete rayjob -n {namespace} {name}) or plan a new run id",
    )
    return {"mode": "created", "name": name, "namespace": namespace, "object": created}


def write_manifest(manifest: dict, out_dir: Optional[str] = None) -> dict:
    """No cluster configured: write the manifest and return the command that applies it."""
    name = manifest.get("metadata", {}).get("name", "rayjob")
    folder = Path(out_dir or tempfile.mkdtemp(prefix="ftlaunch-k8s-"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(dump_manifest(manifest))
    return {"mode": "file", "path": str(path), "command": f"kubectl apply -f {shlex.quote(str(path))}"}


def get_rayjob(name: str, namespace: str, api_client: Any) -> dict:
    api = _kubernetes().client.CustomObjectsApi(api_client)
    return _call(lambda: api.get_namespaced_custom_object(GROUP, VERSION, namespace, RAYJOBS, name),
                 f"reading RayJob {namespace}/{name}", missing=_not_found(name, namespace))


def rayjob_status(name: str, namespace: str, api_client: Any) -> dict:
    """`status.jobStatus` and `status.jobDeploymentStatus` of a RayJob ('' until the operator sets them)."""
    return {**status_row(get_rayjob(name, namespace, api_client)), "name": name, "namespace": namespace}


def status_row(obj: dict) -> dict:
    meta, status = obj.get("metadata") or {}, obj.get("status") or {}
    job, deployment = status.get("jobStatus", ""), status.get("jobDeploymentStatus", "")
    return {
        "name": meta.get("name", ""),
        "namespace": meta.get("namespace", ""),
        "job_status": job,
        "deployment_status": deployment,
        "terminal": job in TERMINAL_JOB or deployment in TERMINAL_DEPLOYMENT,
        "message": status.get("message", ""),
        "ray_cluster": status.get("rayClusterName", ""),
    }


def list_rayjobs(namespace: str, api_client: Any) -> list[dict]:
    """The RayJobs ftlaunch made in `namespace` (selected by its app label)."""
    api = _kubernetes().client.CustomObjectsApi(api_client)
    found = _call(lambda: api.list_namespaced_custom_object(
        GROUP, VERSION, namespace, RAYJOBS, label_selector=f"{APP_LABEL}={APP_NAME}"),
        f"listing RayJobs in {namespace}")
    return found.get("items", [])


def delete_rayjob(name: str, namespace: str, api_client: Any) -> None:
    """Delete a RayJob; the operator then stops its job and deletes its RayCluster."""
    api = _kubernetes().client.CustomObjectsApi(api_client)
    _call(lambda: api.delete_namespaced_custom_object(GROUP, VERSION, namespace, RAYJOBS, name),
          f"deleting RayJob {namespace}/{name}", missing=_not_found(name, namespace))


def submitter_log(name: str, namespace: str, api_client: Any) -> Optional[str]:
    """The log of the newest pod of the submitter Job (K8sJobMode names it after the RayJob and
    labels its pods `job-name=<name>`); None while no such pod exists."""
    core = _kubernetes().client.CoreV1Api(api_client)
    pods = _call(lambda: core.list_namespaced_pod(namespace, label_selector=f"job-name={name}"),
                 f"listing the submitter pods of RayJob {namespace}/{name}").items
    if not pods:
        return None
    newest = max(pods, key=lambda p: str(p.metadata.creation_timestamp or ""))
    pod = newest.metadata.name
    return _call(lambda: core.read_namespaced_pod_log(pod, namespace),
                 f"reading the log of pod {namespace}/{pod}",
                 missing=f"pod {namespace}/{pod} of RayJob {name} is gone; read what is left with: "
                         f"kubectl logs -n {namespace} job/{name}")


def api_client_from(kubeconfig: Optional[str] = None) -> Any:
    """A Kubernetes API client from the kubeconfig (argument, KUBECONFIG, ~/.kube/config)."""
    kubernetes = _kubernetes()
    path = kubeconfig or _default_kubeconfig()
    if path is None:
        raise ClusterError("no kubeconfig found; pass --kubeconfig or set KUBECONFIG")
    try:
        return kubernetes.config.new_client_from_config(config_file=path)
    except Exception as exc:  # a bad kubeconfig raises ConfigException, yaml errors, OSError
        raise ClusterError(f"cannot load kubeconfig {path}: {exc}; check the file or KUBECONFIG") from None


def _call(fn: Callable[[], Any], what: str, *, missing: Optional[str] = None,
          conflict: Optional[str] = None) -> Any:
    """One API call, its failures as one-line errors: what failed, the HTTP answer, the fix."""
    kubernetes = _kubernetes()
    try:
        return fn()
    except kubernetes.client.ApiException as exc:
        if exc.status == 409 and conflict:
            raise SubmissionError(conflict) from None
        if exc.status == 404:
            if missing:
                raise NotFound(missing) from None
            raise ClusterError(f"the cluster has no RayJob resource (ray.io/v1); install the KubeRay "
                               f"operator first (HTTP 404 from {exc.reason})") from None
        raise SubmissionError(f"{what} failed: HTTP {exc.status} {exc.reason}: {_message(exc)}") from None
    except (OSError, kubernetes.client.exceptions.OpenApiException) as exc:
        raise ClusterError(f"cannot reach the Kubernetes API server: {exc}; check the kubeconfig") from None


def _not_found(name: str, namespace: str) -> str:
    return f"RayJob {namespace}/{name} not found; check the name (kubectl get rayjobs -n {namespace})"


def _default_kubeconfig() -> Optional[str]:
    for candidate in os.environ.get("KUBECONFIG", "").split(os.pathsep) + ["~/.kube/config"]:
        if candidate and Path(candidate).expanduser().is_file():
            return str(Path(candidate).expanduser())
    return None


def _message(exc) -> str:
    try:
        return json.loads(exc.body).get("message", "")
    except (TypeError, ValueError, AttributeError):
        return str(exc.body or "")[:200]
