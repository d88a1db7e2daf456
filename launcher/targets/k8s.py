"""The Kubernetes target: a plan becomes a KubeRay RayJob (rendered, validated offline), created
through the Kubernetes API, or written to a file with the `kubectl apply` command when there is no
kubeconfig. status, stop (delete), list and logs (the submitter pod's) go through the API too."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from launcher.errors import ConfigError, PlanError, SubmissionError
from launcher.k8s import submit as kube
from launcher.k8s.constants import RUN_DIR_ANNOTATION, STORAGE_MOUNT
from launcher.k8s.render import ray_image, render_rayjob
from launcher.k8s.validate import mount_problems, validate_manifest
from launcher.runs import record_stop
from launcher.targets import Handle, Target, env_ref, register_target

# The planner's profile vocabulary (cluster/profiles.py), per node; a --profile FILE uses it too.
PROFILE_KEYS = ("name", "nodes", "gpus", "gpu_memory_gib", "gpu_model", "cpus", "memory_gib")
POLL_S = 2.0


def load_profile(ref: Optional[str]) -> dict:
    """A profile by name from cluster/profiles.yaml, or from a YAML file with the same keys. None
    is refused: the pods' shape (GPUs, CPUs, /dev/shm) is the user's choice, never a silent default."""
    if not ref:
        from cluster import profiles

        names = [n for n, p in profiles.load_profiles().items() if not p.get("live")]
        raise ConfigError("Kubernetes needs --profile: the node shape the RayJob's pods get; one of "
                          f"{', '.join(names)} (cluster/profiles.yaml; cpu-8 for a CPU-only job), or a "
                          f"YAML file with keys {', '.join(PROFILE_KEYS)}")
    path = Path(ref)
    if path.suffix in (".yaml", ".yml", ".json") and path.is_file():
        data = yaml.safe_load(path.read_text())
    else:
        from cluster import profiles

        data = profiles.get_profile(ref)
    if not isinstance(data, dict):
        raise ConfigError(f"--profile {ref}: a profile is a YAML mapping with keys {', '.join(PROFILE_KEYS)}")
    missing = [k for k in PROFILE_KEYS if k not in data]
    if missing:
        raise ConfigError(f"--profile {ref}: missing {', '.join(missing)}; add them")
    return data


def render(plan, profile: Optional[str] = None, *, image: Optional[str] = None,
           allow_default_image: bool = False, **options) -> dict:
    """The RayJob for `plan` on `profile`, checked offline against KubeRay's schema and rules, and
    refused when its paths lie outside the volumes its pods mount."""
    node = load_profile(profile)
    if not image and not allow_default_image:
        raise ConfigError(
            f"Kubernetes needs --image: the default {ray_image(node['gpus'] > 0)} lacks ftlaunch, so the "
            f"job would fail at start; build one (FROM it, pip install '.[train]') and pass --image "
            "IMAGE, or --allow-default-image to render with it anyway"
        )
    manifest = render_rayjob(plan, node, image=image, **options)
    problems = validate_manifest(manifest)
    if problems:  # a renderer bug, not a user error: say which rules it broke
        raise PlanError("the rendered RayJob is invalid: " + "; ".join(problems))
    unmounted = mount_problems(manifest)
    if unmounted:
        raise PlanError(f"{unmounted[0]} (relative paths resolve there on Kubernetes; an s3:// or gs:// "
                        "URI needs no volume)")
    return manifest


@dataclass
class RayJobHandle(Handle):
    """A RayJob, by name and namespace. Made from a file-mode submit it only says how to apply it."""

    submission_id: str  # the RayJob's name
    namespace: str
    run_dir: Optional[str] = None  # on the cluster's volume; read here only where it is mounted
    api_client: Any = None
    file: Optional[dict] = None  # {"path", "command"} when the manifest was written, not created
    follows = False  # a RayJob outlives this process: follow it with status/logs -f

    def _api(self):
        if self.file:
            raise SubmissionError(f"RayJob {self.submission_id} was written to {self.file['path']}, not "
                                  f"created; apply it with: {self.file['command']}")
        return self.api_client

    def _get(self) -> dict:
        return kube.get_rayjob(self.submission_id, self.namespace, self._api())

    def row(self) -> dict:
        return kube.rayjob_status(self.submission_id, self.namespace, self._api())

    def status(self) -> str:
        return _state(self.row())

    def logs(self) -> str:
        name, ns = self.submission_id, self.namespace
        mode = (self._get().get("spec") or {}).get("submissionMode", "K8sJobMode")
        if mode != "K8sJobMode":
            raise SubmissionError(f"RayJob {ns}/{name} runs in {mode}: it has no submitter pod to read; "
                                  f"read the head's log with: kubectl logs -n {ns} -l ray.io/node-type=head")
        text = kube.submitter_log(name, ns, self._api())
        if text is None:
            raise SubmissionError(f"RayJob {ns}/{name} has no submitter pod yet ({self.status()}); try "
                                  f"again shortly, or: kubectl logs -n {ns} job/{name}")
        return text

    def stop(self) -> bool:
        """Delete the RayJob (the operator stops the job and removes its cluster); False when it
        has already ended (it is kept, with its status, until its TTL)."""
        if self.row()["terminal"]:
            return False
        kube.delete_rayjob(self.submission_id, self.namespace, self._api())
        record_stop(self.run_dir, self.submission_id)  # where the cluster's volume is mounted here
        return True

    def wait(self, timeout: Optional[float] = None, on_logs: Optional[Callable[[str], None]] = None,
             poll: float = POLL_S) -> str:
        """Block until the RayJob ends (or is deleted: STOPPED); stream the submitter's log to `on_logs`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        seen, api, name, ns = 0, self._api(), self.submission_id, self.namespace
        while True:
            try:
                row = self.row()
            except kube.NotFound:  # deleted by a stop: what is gone has stopped
                return "STOPPED"
            if on_logs:
                text = kube.submitter_log(name, ns, api) or ""
                if len(text) > seen:
                    on_logs(text[seen:])
                    seen = len(text)
            if row["terminal"]:
                return _state(row)
            if deadline is not None and time.monotonic() > deadline:
                raise SubmissionError(
                    f"RayJob {ns}/{name} still {_state(row)} after {timeout:.0f}s; "
                    f"follow it with: ftlaunch logs -f {name} --target k8s --namespace {ns}")
            time.sleep(poll)

    def format_row(self, row: dict) -> list[str]:
        return [f"{row['name']}  {row['job_status'] or '-'}  (deployment {row['deployment_status'] or '-'})"
                f"  {row['message']}".rstrip()]

    def submitted_lines(self) -> list[str]:
        if self.file:
            return [f"no kubeconfig; wrote the RayJob to {self.file['path']}",
                    f"next: {self.file['command']}"]
        name, ns = self.submission_id, self.namespace
        return [f"created RayJob {ns}/{name}", "next:",
                f"  ftlaunch status {name} --target k8s --namespace {ns}",
                f"  kubectl get rayjob -n {ns} {name}"]


class K8sTarget(Target):
    name = "k8s"
    help = "a KubeRay RayJob (through the Kubernetes API, or a manifest to apply)"

    def base_dir(self) -> Path:
        # Relative paths name places on the cluster's shared volume, not on this machine.
        return Path(STORAGE_MOUNT)

    def check_storage(self, path: str) -> list[str]:
        return [f"storage {path} is a local path: the cluster's nodes must see it (a shared filesystem)"]

    def check_env_ref(self, key: str, value: str) -> None:
        ref = env_ref(key, value)
        if ref is not None and ref.kind == "env":
            raise PlanError(f"env.{key}: {value} reads the cluster's environment; on Kubernetes use "
                            "secret:NAME/KEY (a Secret the pods mount as this variable)")

    def submit(self, plan, *, address: Optional[str] = None, profile: Optional[str] = None,
               image: Optional[str] = None, allow_default_image: bool = False,
               namespace: Optional[str] = None, kubeconfig: Optional[str] = None, api_client: Any = None,
               out_dir: str = ".", **options) -> RayJobHandle:
        """Create the RayJob for `plan`; with no kubeconfig, write it under `out_dir` instead."""
        manifest = render(plan, profile, image=image, allow_default_image=allow_default_image,
                          namespace=namespace or "default")
        out = kube.submit_rayjob(manifest, kubeconfig=kubeconfig, api_client=api_client, out_dir=out_dir)
        meta = manifest["metadata"]
        if out["mode"] == "file":
            return RayJobHandle(meta["name"], meta["namespace"], plan.run_dir,
                                file={"path": out["path"], "command": out["command"]})
        return RayJobHandle(meta["name"], meta["namespace"], plan.run_dir,
                            api_client or kube.api_client_from(kubeconfig))

    def attach(self, job_id: str, address: Optional[str] = None, *, namespace: Optional[str] = None,
               kubeconfig: Optional[str] = None, api_client: Any = None, **options) -> RayJobHandle:
        namespace = namespace or "default"
        api = api_client or kube.api_client_from(kubeconfig)
        obj = kube.get_rayjob(job_id, namespace, api)
        run_dir = ((obj.get("metadata") or {}).get("annotations") or {}).get(RUN_DIR_ANNOTATION)
        return RayJobHandle(job_id, namespace, run_dir, api)

    def list(self, address: Optional[str] = None, *, namespace: Optional[str] = None,
             kubeconfig: Optional[str] = None, api_client: Any = None, **options) -> list[dict]:
        api = api_client or kube.api_client_from(kubeconfig)
        items = kube.list_rayjobs(namespace or "default", api)
        rows = []
        for obj in sorted(items, key=lambda o: str((o.get("metadata") or {}).get("creationTimestamp", ""))):
            meta, status = obj.get("metadata") or {}, obj.get("status") or {}
            rows.append({
                "submission_id": meta.get("name"),
                "status": _state(kube.status_row(obj)),
                "kind": (meta.get("labels") or {}).get("app.kubernetes.io/component"),
                "name": _plan_name(obj),
                "run_dir": (meta.get("annotations") or {}).get(RUN_DIR_ANNOTATION),
                "start_time": status.get("startTime"),
                "end_time": status.get("endTime"),
                "message": status.get("message"),
            })
        return rows


def _state(row: dict) -> str:
    """One word for a RayJob, in the Jobs API's terms: its jobStatus, FAILED for a deployment that
    failed before any job ran, else PENDING."""
    failed = row["deployment_status"] in ("Failed", "ValidationFailed")
    return row["job_status"] or ("FAILED" if failed else "PENDING")


def _plan_name(obj: dict) -> Optional[str]:
    """The spec's name, from the plan the RayJob carries in its runtime env."""
    from launcher.jobplan import PLAN_ENV

    try:
        env = yaml.safe_load(obj["spec"]["runtimeEnvYAML"])["env_vars"]
        return json.loads(env[PLAN_ENV])["name"]
    except (KeyError, TypeError, ValueError, yaml.YAMLError):
        return None


register_target(K8sTarget())
