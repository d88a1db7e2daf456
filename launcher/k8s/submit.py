"""Submit a rendered RayJob to Kubernetes (or hand back the `kubectl apply` command), read its status.

`kubernetes` is an extra (`pip install 'ftlaunch[k8s]'`), imported only when a call needs it.
"""

from __future__ import annotations

import os
import shlex
import tempfile
from pathlib import Path
from typing import Any, Optional

from launcher.errors import ClusterError, MissingExtraError, SubmissionError
from launcher.k8s.render import dump_manifest

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
TERMINAL_JOB = ("STOPPED", "SUCCEEDED", "FAILED")
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
    config_path = kubeconfig or _default_kubeconfig()
    if api_client is None and config_path is None:
        return write_manifest(manifest, out_dir)
    kubernetes = _kubernetes()
    if api_client is None:
        try:
            api_client = kubernetes.config.new_client_from_config(config_file=config_path)
        except Exception as exc:  # a bad kubeconfig raises ConfigException, yaml errors, OSError
            raise ClusterError(f"cannot load kubeconfig {config_path}: {exc}; check the file or "
                               "KUBECONFIG") from None
    api = kubernetes.client.CustomObjectsApi(api_client)
    try:
        created = api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest)
    except kubernetes.client.ApiException as exc:
        if exc.status == 409:
            raise SubmissionError(f"RayJob {namespace}/{name} already exists; delete it "
                                  f"(kubectl delete rayjob -n {namespace} {name}) or plan a new run id") from None
        if exc.status == 404:
            raise ClusterError(f"the cluster has no RayJob resource (ray.io/v1); install the KubeRay "
                               f"operator first (HTTP 404 from {exc.reason})") from None
        raise SubmissionError(f"creating RayJob {namespace}/{name} failed: HTTP {exc.status} "
                              f"{exc.reason}: {_message(exc)}") from None
    except (OSError, kubernetes.client.exceptions.OpenApiException) as exc:
        raise ClusterError(f"cannot reach the Kubernetes API server: {exc}; check the kubeconfig") from None
    return {"mode": "created", "name": name, "namespace": namespace, "object": created}


def write_manifest(manifest: dict, out_dir: Optional[str] = None) -> dict:
    """No cluster configured: write the manifest and return the command that applies it."""
    name = manifest.get("metadata", {}).get("name", "rayjob")
    folder = Path(out_dir or tempfile.mkdtemp(prefix="ftlaunch-k8s-"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(dump_manifest(manifest))
    return {"mode": "file", "path": str(path), "command": f"kubectl apply -f {shlex.quote(str(path))}"}


def rayjob_status(name: str, namespace: str, api_client: Any) -> dict:
    """`status.jobStatus` and `status.jobDeploymentStatus` of a RayJob ('' until the operator sets them)."""
    kubernetes = _kubernetes()
    api = kubernetes.client.CustomObjectsApi(api_client)
    try:
        obj = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except kubernetes.client.ApiException as exc:
        if exc.status == 404:
            raise SubmissionError(f"RayJob {namespace}/{name} not found; check the name "
                                  f"(kubectl get rayjobs -n {namespace})") from None
        raise SubmissionError(f"reading RayJob {namespace}/{name} failed: HTTP {exc.status} "
                              f"{exc.reason}: {_message(exc)}") from None
    status = obj.get("status") or {}
    job, deployment = status.get("jobStatus", ""), status.get("jobDeploymentStatus", "")
    return {
        "name": name,
        "namespace": namespace,
        "job_status": job,
        "deployment_status": deployment,
        "terminal": job in TERMINAL_JOB or deployment in TERMINAL_DEPLOYMENT,
        "message": status.get("message", ""),
        "ray_cluster": status.get("rayClusterName", ""),
    }


def _default_kubeconfig() -> Optional[str]:
    for candidate in os.environ.get("KUBECONFIG", "").split(os.pathsep) + ["~/.kube/config"]:
        if candidate and Path(candidate).expanduser().is_file():
            return str(Path(candidate).expanduser())
    return None


def _message(exc) -> str:
    import json

    try:
        return json.loads(exc.body).get("message", "")
    except (TypeError, ValueError, AttributeError):
        return str(exc.body or "")[:200]


def api_client_from(kubeconfig: Optional[str] = None) -> Any:
    """A Kubernetes API client from the kubeconfig (argument, KUBECONFIG, ~/.kube/config)."""
    kubernetes = _kubernetes()
    path = kubeconfig or _default_kubeconfig()
    if path is None:
        raise ClusterError("no kubeconfig found; pass --kubeconfig or set KUBECONFIG")
    try:
        return kubernetes.config.new_client_from_config(config_file=path)
    except Exception as exc:
        raise ClusterError(f"cannot load kubeconfig {path}: {exc}; check the file or KUBECONFIG") from None
