"""KubeRay manifests from a JobPlan and a resource profile: a RayCluster spec and a RayJob around it.

Pure functions: no cluster, no network. The image must already contain the project (`launcher`,
`jobs`, `cluster`): a Kubernetes client's local paths cannot be shipped as `py_modules`, so the
rendered runtime env keeps only `env_vars`. Build it with e.g.
`FROM rayproject/ray:2.60.0-py311-gpu` + `COPY . /app` + `pip install /app[train]`, and pass it as `image=`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
from typing import TYPE_CHECKING, Optional

import yaml

from common import refs
from launcher.errors import PlanError
from launcher.k8s.constants import (
    API_VERSION,
    APP_LABEL,
    APP_NAME,
    DEFAULT_PVC,
    MAX_RAYCLUSTER_NAME,
    MAX_RAYJOB_NAME,
    PYTHON_TAG,
    RAY_VERSION,
    RUN_DIR_ANNOTATION,
    STORAGE_MOUNT,
    SUBMISSION_MODES,
)

if TYPE_CHECKING:
    from launcher.jobplan import JobPlan

GPU_RESOURCE = "nvidia.com/gpu"
# NVIDIA GPU feature discovery's product label, e.g. NVIDIA-A100-SXM4-80GB.
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
# The rayproject images run as user `ray` (uid 1000, group users = 100).
RAY_UID, RAY_GID = 1000, 100
HEAD = {"cpu": "2", "memory": "8Gi"}
AUTOSCALER = {"cpu": "500m", "memory": "512Mi"}
SUBMITTER = {"cpu": "500m", "memory": "1Gi"}
# Part of a node the kubelet and daemonsets keep: a pod asking for the whole node never schedules.
RESERVED_CPUS = 1
MEMORY_FRACTION = 0.9


def ray_image(gpu: bool) -> str:
    return f"rayproject/ray:{RAY_VERSION}-{PYTHON_TAG}" + ("-gpu" if gpu else "")


def k8s_name(run_id: str, limit: int = MAX_RAYJOB_NAME) -> str:
    """A DNS-1035 label from a run id: lower-case, starts with a letter, at most `limit` chars.

    A shortened name keeps a hash of the full run id, so two long run ids never collide.
    """
    name = re.sub(r"[^a-z0-9-]+", "-", run_id.lower())
    name = re.sub(r"-{2,}", "-", name).strip("-")
    if not name or not name[0].isalpha():
        name = f"ft-{name}".rstrip("-")
    if len(name) > limit:
        digest = hashlib.sha256(run_id.encode()).hexdigest()[:6]
        name = f"{name[: limit - 7].rstrip('-')}-{digest}"
    return name


def render_rayjob(
    plan: JobPlan,
    profile: dict,
    *,
    image: Optional[str] = None,
    namespace: str = "default",
    queue: Optional[str] = None,
    submission_mode: str = "K8sJobMode",
    pvc: str = DEFAULT_PVC,
    deadline_s: int = 24 * 3600,
    ttl_s: int = 600,
    retries: int = 1,
    entrypoint_resources: Optional[dict] = None,
) -> dict:
    """A RayJob (ray.io/v1) that runs `plan` on a fresh RayCluster sized from `profile`.

    `profile` is the planner's (cluster/profiles.py), per node: nodes, gpus, cpus, memory_gib,
    gpu_model, gpu_memory_gib.

    Uses only the plan's fields (kind, name, run_id, resources, entrypoint, env), so any job kind renders.
    """
    if submission_mode not in SUBMISSION_MODES:
        raise PlanError(
            f"submission mode {submission_mode!r} is unknown; use one of: {', '.join(SUBMISSION_MODES)}"
        )
    env_vars = dict(plan.runtime_env.get("env_vars", {}))
    secrets = {k: v for k, v in env_vars.items() if str(v).startswith(refs.SECRET_PREFIX)}
    plain = {k: v for k, v in env_vars.items() if k not in secrets}
    pod_env = [_secret_env(k, v) for k, v in sorted(secrets.items())]
    mount = None if "://" in plan.storage_path else volume_mount(plan.storage_path)
    pods = worker_pods(profile, plan.resources)
    # Kueue admits fixed-size gangs: a queued job gets no autoscaler, exactly the pods it needs.
    cluster = _cluster_spec(
        profile, pods, pods, pods if queue else profile["nodes"],
        image=image, storage_mount=mount, pvc=pvc, env=pod_env, autoscale=not queue,
    )
    labels = {
        APP_LABEL: APP_NAME,
        "app.kubernetes.io/component": plan.kind,
        "ftlaunch/run-id": _label_value(plan.run_id),
    }
    if queue:
        labels["kueue.x-k8s.io/queue-name"] = queue
    interactive = submission_mode == "InteractiveMode"
    spec = {
        "entrypoint": plan.entrypoint,
        # Never py_modules: they name paths on the submitting machine; the image carries the code.
        "runtimeEnvYAML": yaml.safe_dump({"env_vars": plain}, sort_keys=True, width=float("inf")),
        "jobId": plan.submission_id,
        "submissionMode": submission_mode,
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": ttl_s,
        "activeDeadlineSeconds": deadline_s,
        # Each retry makes a new RayCluster; jobs resume from their checkpoints under storage_path.
        "backoffLimit": 0 if interactive else retries,
    }
    if plan.entrypoint_num_cpus:
        spec["entrypointNumCpus"] = plan.entrypoint_num_cpus
    if entrypoint_resources:
        spec["entrypointResources"] = json.dumps(entrypoint_resources, sort_keys=True)
    if queue:
        spec["suspend"] = True  # Kueue admits the whole gang, then unsuspends
    if submission_mode == "K8sJobMode":
        spec["submitterPodTemplate"] = _submitter_template(image or _default_image(profile))
    spec["rayClusterSpec"] = cluster
    return {
        "apiVersion": API_VERSION,
        "kind": "RayJob",
        "metadata": {
            "name": k8s_name(plan.run_id),
            "namespace": namespace,
            "labels": labels,
            "annotations": {"ftlaunch/run-id": plan.run_id, RUN_DIR_ANNOTATION: plan.run_dir},
        },
        "spec": spec,
    }


def render_raycluster(
    profile: dict,
    *,
    name: Optional[str] = None,
    image: Optional[str] = None,
    namespace: str = "default",
    storage_path: str = STORAGE_MOUNT,
    pvc: str = DEFAULT_PVC,
    min_workers: int = 0,
) -> dict:
    """A long-lived autoscaling RayCluster for `profile` (0..nodes workers), for `ray job submit`."""
    if not 0 <= min_workers <= profile["nodes"]:
        raise PlanError(f"min_workers={min_workers} must be within 0..{profile['nodes']} "
                        f"(the nodes of profile {profile['name']})")
    cluster = _cluster_spec(
        profile, min_workers, min_workers, profile["nodes"],
        image=image, storage_mount=storage_path, pvc=pvc, env=[],
    )
    return {
        "apiVersion": API_VERSION,
        "kind": "RayCluster",
        "metadata": {
            "name": k8s_name(name or f"ftlaunch-{profile['name']}", MAX_RAYCLUSTER_NAME),
            "namespace": namespace,
            "labels": {APP_LABEL: APP_NAME, "ftlaunch/profile": _label_value(profile["name"])},
        },
        "spec": cluster,
    }


def volume_mount(storage_path: str) -> str:
    """Where the storage volume is mounted: at its root when the run folder is on it, so the
    relative data and model paths (which resolve under the same root) are on it too."""
    return STORAGE_MOUNT if is_under(storage_path, STORAGE_MOUNT) else storage_path


def is_under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def worker_pods(profile: dict, resources: dict) -> int:
    """Worker pods (one per node) that hold the plan's Ray workers; refuses what cannot schedule."""
    workers = resources.get("workers", 0)
    gpus, cpus = resources.get("gpus_per_worker", 0), resources.get("cpus_per_worker", 0)
    node_gpus, node_cpus = profile["gpus"], _pod_cpus(profile)
    name = profile["name"]
    if gpus and not node_gpus:
        raise PlanError(f"profile {name} has no GPUs but the job asks {gpus} per worker; "
                        "use a GPU profile or set resources.gpus_per_worker=0")
    if gpus > node_gpus:
        raise PlanError(f"resources.gpus_per_worker={gpus} exceeds profile {name}'s {node_gpus} "
                        "GPUs per node; lower it or pick a larger profile")
    if cpus > node_cpus:
        raise PlanError(f"resources.cpus_per_worker={cpus} exceeds the {node_cpus} CPUs a pod "
                        f"gets on profile {name}; lower it")
    per_pod = min(node_gpus // gpus if gpus else math.inf, node_cpus // cpus if cpus else math.inf)
    pods = 0 if workers == 0 else math.ceil(workers / per_pod) if per_pod != math.inf else 1
    if pods > profile["nodes"]:
        raise PlanError(f"{workers} workers need {pods} nodes but profile {name} has "
                        f"{profile['nodes']}; lower resources.workers or pick a larger profile")
    return pods


def dump_manifest(doc: dict, header: str = "") -> str:
    """YAML text of a manifest, multi-line strings as blocks, key order kept: stable for golden files."""
    body = yaml.dump(doc, Dumper=_BlockDumper, sort_keys=False, default_flow_style=False, width=4096)
    return header + body


# ---------------------------------------------------------------------------------------------


def _cluster_spec(profile, replicas, min_replicas, max_replicas, *, image, storage_mount, pvc, env,
                  autoscale=True) -> dict:
    gpu = profile["gpus"] > 0
    image = image or _default_image(profile)
    node_cpus = _pod_cpus(profile)
    memory = f"{int(profile['memory_gib'] * MEMORY_FRACTION)}Gi"
    worker_res = {"cpu": str(node_cpus), "memory": memory}
    if gpu:
        worker_res[GPU_RESOURCE] = str(profile["gpus"])
    # The head has no GPU: NVIDIA_VISIBLE_DEVICES=void keeps a GPU image from grabbing one anyway.
    head_env = list(env) + ([{"name": "NVIDIA_VISIBLE_DEVICES", "value": "void"}] if gpu else [])
    head = _pod_template(
        "ray-head", image, HEAD, head_env, *_volumes(storage_mount, pvc),
        ports=[("gcs-server", 6379), ("dashboard", 8265), ("client", 10001)],
    )
    worker = _pod_template(
        "ray-worker", image, worker_res, env, *_volumes(storage_mount, pvc, shm=memory if gpu else None)
    )
    if gpu:
        worker["spec"]["tolerations"] = [
            {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
        ]
        worker["spec"]["nodeSelector"] = {GPU_PRODUCT_LABEL: profile["gpu_model"]}
    group = {
        "groupName": "gpu-workers" if gpu else "cpu-workers",
        "replicas": replicas,
        "minReplicas": min_replicas,
        "maxReplicas": max_replicas,
        "rayStartParams": {},
        "template": worker,
    }
    # Token authentication, Ray's own default since 2.52: KubeRay makes the cluster's token Secret
    # and gives every pod (and the RayJob's submitter) RAY_AUTH_MODE and the token.
    spec = {"rayVersion": RAY_VERSION, "enableInTreeAutoscaling": autoscale, "authOptions": {"mode": "token"}}
    if autoscale:
        spec["autoscalerOptions"] = {
            "upscalingMode": "Default",
            "idleTimeoutSeconds": 300,
            "resources": {"limits": dict(AUTOSCALER), "requests": dict(AUTOSCALER)},
            "securityContext": _container_security(),
        }
    return {
        **spec,
        "headGroupSpec": {
            # num-cpus 0 keeps training off the head, which has no GPU.
            "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
            "template": head,
        },
        "workerGroupSpecs": [group],
    }


def _pod_template(name, image, resources, env, volumes, mounts, ports=()) -> dict:
    container = {
        "name": name,
        "image": image,
        "resources": {"limits": dict(resources), "requests": dict(resources)},
        "securityContext": _container_security(),
        "volumeMounts": mounts,
    }
    if env:
        container["env"] = copy.deepcopy(env)
    if ports:
        container["ports"] = [{"containerPort": port, "name": pname} for pname, port in ports]
    return {"spec": {"securityContext": _pod_security(), "containers": [container], "volumes": volumes}}


def _submitter_template(image: str) -> dict:
    # No command: the operator injects its `ray job submit` script into the first container.
    container = {
        "name": "ray-job-submitter",
        "image": image,
        "resources": {"limits": dict(SUBMITTER), "requests": dict(SUBMITTER)},
        "securityContext": _container_security(),
    }
    return {"spec": {"restartPolicy": "Never", "securityContext": _pod_security(), "containers": [container]}}


def _volumes(storage_mount, pvc, shm=None):
    volumes = [{"name": "ray-logs", "emptyDir": {}}]
    mounts = [{"name": "ray-logs", "mountPath": "/tmp/ray"}]
    if storage_mount:
        volumes.append({"name": "storage", "persistentVolumeClaim": {"claimName": pvc}})
        mounts.append({"name": "storage", "mountPath": storage_mount})
    if shm:  # NCCL and data loaders need more than the 64 MiB default /dev/shm
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    return volumes, mounts


def _pod_security() -> dict:
    return {
        "runAsNonRoot": True,
        "runAsUser": RAY_UID,
        "runAsGroup": RAY_GID,
        "fsGroup": RAY_GID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _container_security() -> dict:
    return {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
    }


def _secret_env(name: str, value: str) -> dict:
    """`secret:NAME/KEY` -> a secretKeyRef; the value itself never appears in a manifest."""
    try:
        ref = refs.parse(value)
    except ValueError as exc:
        raise PlanError(f"env.{name}: {exc}") from None
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}


def _default_image(profile: dict) -> str:
    return ray_image(profile["gpus"] > 0)


def _pod_cpus(profile: dict) -> int:
    return max(1, int(profile["cpus"]) - RESERVED_CPUS)


def _label_value(value: str) -> str:
    value = re.sub(r"[^A-Za-z0-9_.-]", "-", value)[:63]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", value)


class _BlockDumper(yaml.SafeDumper):
    def ignore_aliases(self, data):  # no &id001 anchors: every manifest reads on its own
        return True


def _str_representer(dumper, data):
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_BlockDumper.add_representer(str, _str_representer)
