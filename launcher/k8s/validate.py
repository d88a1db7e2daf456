"""Offline validation of RayJob / RayCluster manifests: the KubeRay v1.7.0 CRD schema as the
apiserver applies it (defaults, null pruning, unknown fields rejected), its CEL rules, and the
operator's own semantic rules (`validation.go`), which the apiserver never sees.

One problem per line: the field path, the bad value, and the fix.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any, Iterable

import yaml

from launcher.k8s.constants import API_VERSION, MAX_RAYCLUSTER_NAME, MAX_RAYJOB_NAME, SUBMISSION_MODES
from launcher.k8s.schema import (
    SCHEMAS,
    _raw_schema,
    _schema_problems,
    _short,
    apply_defaults,
    list_key_problems,
    prune_nulls,
)

MAX_NAME = {"RayJob": MAX_RAYJOB_NAME, "RayCluster": MAX_RAYCLUSTER_NAME}
GENERATED_SUFFIX = 5  # the apiserver appends 5 characters to generateName
MANAGED_BY = ("ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue")
RESOURCE_START_PARAMS = ("num-cpus", "num-gpus", "memory", "resources")
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def validate_manifest(doc: Any) -> list[str]:
    """Every problem the apiserver or the KubeRay operator would report for `doc`; [] when it is valid."""
    if not isinstance(doc, dict):
        return [f"(document): {_short(doc)} is not a mapping; a manifest is a YAML mapping"]
    kind = doc.get("kind")
    if kind not in SCHEMAS:
        return [f"kind: {_short(kind)} is not supported; use RayJob or RayCluster"]
    problems = []
    if doc.get("apiVersion") != API_VERSION:
        problems.append(f"apiVersion: {_short(doc.get('apiVersion'))} is not served as the current "
                        f"version; use {API_VERSION}")
    doc = prune_nulls(copy.deepcopy(doc))
    schema = _raw_schema(kind)
    apply_defaults(doc, schema)
    problems += _schema_problems(doc, kind)
    problems += list_key_problems(doc, schema)
    problems += _metadata_problems(doc.get("metadata"), kind)
    spec = doc.get("spec")
    if isinstance(spec, dict):
        if kind == "RayJob":
            problems += rayjob_problems(spec)
        else:
            problems += cluster_spec_problems(spec, "spec")
    return problems


def validate_file(path: str) -> list[str]:
    """Validate every document of a YAML file; problems are prefixed with `file[#doc]`."""
    text = Path(path).read_text()
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        return [f"{path}: not valid YAML: {exc}".replace("\n", " ")]
    if not docs:
        return [f"{path}: no YAML documents; expected a RayJob or RayCluster"]
    problems = []
    for i, doc in enumerate(docs):
        where = path if len(docs) == 1 else f"{path}#{i}"
        problems += [f"{where}: {p}" for p in validate_manifest(doc)]
    return problems


def _metadata_problems(meta: Any, kind: str) -> list[str]:
    if not isinstance(meta, dict):
        return ["metadata: missing; add metadata.name"]
    limit = MAX_NAME[kind]
    name, prefix = meta.get("name"), meta.get("generateName")
    if name is None and prefix is None:
        return ["metadata.name: missing; set metadata.name (or metadata.generateName with kubectl create)"]
    problems = []
    if name is not None:
        if not isinstance(name, str) or not DNS_1035.match(name):
            problems.append(f"metadata.name: {_short(name)} is not a DNS-1035 label; use lower-case "
                            "letters, digits and '-', starting with a letter")
        elif len(name) > limit:
            problems.append(f"metadata.name: {_short(name)} has {len(name)} characters; the operator "
                            f"allows at most {limit} for a {kind}: shorten it")
    elif isinstance(prefix, str):
        if not re.fullmatch(r"[a-z][-a-z0-9]*", prefix):
            problems.append(f"metadata.generateName: {_short(prefix)} does not start a DNS-1035 "
                            "label; use lower-case letters, digits and '-'")
        elif len(prefix) + GENERATED_SUFFIX > limit:
            problems.append(f"metadata.generateName: {_short(prefix)} leaves no room for the 5 "
                            f"generated characters within {limit}; shorten it to "
                            f"{limit - GENERATED_SUFFIX}")
    return problems


def rayjob_problems(spec: dict) -> list[str]:
    """The RayJob rules of the CRD's CEL and of the operator (ValidateRayJobSpec)."""
    problems = []
    mode = spec.get("submissionMode", "K8sJobMode")
    shutdown = spec.get("shutdownAfterJobFinishes", False)
    selector, cluster = spec.get("clusterSelector"), spec.get("rayClusterSpec")
    backoff = spec.get("backoffLimit", 0)
    if mode not in SUBMISSION_MODES:
        problems.append(f"spec.submissionMode: {_short(mode)} is unknown (the CRD has no enum, the "
                        f"operator rejects it); use one of: {', '.join(SUBMISSION_MODES)}")
    if not spec.get("entrypoint") and mode != "InteractiveMode" and not _submitter_has_command(spec):
        problems.append(f"spec.entrypoint: missing with submissionMode {mode}; set the command to run "
                        "(only InteractiveMode or a submitter container with its own command may omit it)")
    if bool(selector) == (cluster is not None):
        got = "both are set" if selector else "neither is set"
        problems.append(f"spec.rayClusterSpec / spec.clusterSelector: {got}; set exactly one "
                        "(rayClusterSpec for a new cluster, clusterSelector for an existing one)")
    ttl = spec.get("ttlSecondsAfterFinished", 0)
    if isinstance(ttl, int) and ttl < 0:
        problems.append(f"spec.ttlSecondsAfterFinished: {ttl} is negative; use 0 or more")
    if isinstance(ttl, int) and ttl > 0 and not shutdown:
        problems.append(f"spec.ttlSecondsAfterFinished: {ttl} needs spec.shutdownAfterJobFinishes: "
                        "true; set it, or drop the TTL")
    deadline = spec.get("activeDeadlineSeconds")
    if isinstance(deadline, int) and deadline <= 0:
        problems.append(f"spec.activeDeadlineSeconds: {deadline} must be positive; use seconds > 0 or omit it")
    if isinstance(backoff, int):
        if backoff < 0:
            problems.append(f"spec.backoffLimit: {backoff} is negative; use 0 or more")
        elif backoff > 0 and (selector or mode == "InteractiveMode"):
            why = "clusterSelector" if selector else "InteractiveMode"
            problems.append(f"spec.backoffLimit: {backoff} is not allowed with {why}; set it to 0")
    if spec.get("suspend") is True:
        if not shutdown:
            problems.append("spec.suspend: true needs spec.shutdownAfterJobFinishes: true; set it")
        if selector:
            problems.append("spec.suspend: true is not allowed with spec.clusterSelector; use rayClusterSpec")
    if mode == "SidecarMode":
        for field in ("submitterPodTemplate", "submitterConfig", "clusterSelector"):
            if spec.get(field):
                problems.append(f"spec.{field}: not allowed with submissionMode SidecarMode; remove it")
        head = _get(cluster, "headGroupSpec", "template", "spec") or {}
        if head.get("restartPolicy") not in (None, "Never"):
            problems.append(f"spec.rayClusterSpec.headGroupSpec.template.spec.restartPolicy: "
                            f"{_short(head['restartPolicy'])} is not allowed with SidecarMode; use Never or omit it")
    problems += _runtime_env_problems(spec.get("runtimeEnvYAML"))
    problems += _entrypoint_resources_problems(spec.get("entrypointResources"))
    problems += _deletion_problems(spec.get("deletionStrategy"), shutdown)
    if "managedBy" in spec and spec["managedBy"] not in MANAGED_BY:
        problems.append(f"spec.managedBy: {_short(spec['managedBy'])} is not allowed; use one of: "
                        f"{', '.join(MANAGED_BY)}")
    if isinstance(cluster, dict):
        problems += cluster_spec_problems(cluster, "spec.rayClusterSpec")
    return problems


def cluster_spec_problems(spec: dict, where: str) -> list[str]:
    """RayClusterSpec rules of the operator (ValidateRayClusterSpec) and the CRD's CEL."""
    problems = []
    if "managedBy" in spec and spec["managedBy"] not in MANAGED_BY:
        problems.append(f"{where}.managedBy: {_short(spec['managedBy'])} is not allowed; use one of: "
                        f"{', '.join(MANAGED_BY)}")
    groups = [("headGroupSpec", spec.get("headGroupSpec"))]
    groups += [(f"workerGroupSpecs[{i}]", g) for i, g in enumerate(spec.get("workerGroupSpecs") or [])]
    for name, group in groups:
        if not isinstance(group, dict):
            continue
        path = f"{where}.{name}"
        containers = _get(group, "template", "spec", "containers")
        if isinstance(_get(group, "template", "spec"), dict) and not containers:
            problems.append(f"{path}.template.spec.containers: empty; add the Ray container")
        params = group.get("rayStartParams") or {}
        if "labels" in params:
            problems.append(f"{path}.rayStartParams.labels: not allowed; use {path}.labels")
        if group.get("resources"):
            clash = sorted(k for k in params if k in RESOURCE_START_PARAMS)
            if clash:
                problems.append(f"{path}.rayStartParams: {', '.join(clash)} set together with "
                                f"{path}.resources; keep the resources in one place")
        if name.startswith("workerGroupSpecs"):
            problems += _replica_problems(group, path)
    return problems


def _replica_problems(group: dict, path: str) -> list[str]:
    low, high = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1)
    replicas = group.get("replicas", 0)
    if not all(isinstance(v, int) for v in (low, high, replicas)):
        return []  # the schema already reported the type
    problems = []
    for field, value in (("minReplicas", low), ("maxReplicas", high)):
        if value < 0:
            problems.append(f"{path}.{field}: {value} is negative; use 0 or more")
    if low > high:
        problems.append(f"{path}.minReplicas: {low} exceeds maxReplicas {high}; make minReplicas <= maxReplicas")
    elif not low <= replicas <= high:
        problems.append(f"{path}.replicas: {replicas} is outside [minReplicas {low}, maxReplicas {high}] "
                        "(the operator would clamp it); set it within the range")
    return problems


def _not_a_string(field: str, value: Any, written: str) -> list[str]:
    """A mapping (or list, number) where the CRD wants one string that holds YAML or JSON."""
    if value is None or isinstance(value, str):
        return []
    return [f"{field}: a {type(value).__name__} given ({_short(value)}); the CRD wants it as one "
            f"{written} string: write `{field.split('.')[-1]}: |` and indent the text under it"]


def _runtime_env_problems(text: Any) -> list[str]:
    if text is None or not isinstance(text, str):
        return _not_a_string("spec.runtimeEnvYAML", text, "YAML")
    try:
        env = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0]
        return [f"spec.runtimeEnvYAML: does not parse as YAML ({first}); write a YAML mapping"]
    if not isinstance(env, dict):
        return [f"spec.runtimeEnvYAML: {_short(env)} is not a YAML mapping; write keys such as "
                "env_vars:, pip:, working_dir:"]
    return []


def _entrypoint_resources_problems(text: Any) -> list[str]:
    if text is None or not isinstance(text, str):
        return _not_a_string("spec.entrypointResources", text, "JSON")
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return [f"spec.entrypointResources: {_short(text)} is not JSON; write a JSON object string "
                "such as '{\"custom\": 1}'"]
    if not isinstance(value, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value.values()
    ):
        return [f"spec.entrypointResources: {_short(text)} is not a JSON object of numbers; "
                "write '{\"custom\": 1}'"]
    return []


def _deletion_problems(strategy: Any, shutdown: bool) -> list[str]:
    if not isinstance(strategy, dict):
        return []
    problems = []
    legacy = "onSuccess" in strategy or "onFailure" in strategy
    if legacy and "deletionRules" in strategy:
        problems.append("spec.deletionStrategy: onSuccess/onFailure together with deletionRules; "
                        "keep only deletionRules")
    elif not ("deletionRules" in strategy or ("onSuccess" in strategy and "onFailure" in strategy)):
        problems.append("spec.deletionStrategy: needs both onSuccess and onFailure, or deletionRules; add them")
    if shutdown:
        problems.append("spec.deletionStrategy: not allowed with shutdownAfterJobFinishes: true; "
                        "drop one of them")
    for i, rule in enumerate(strategy.get("deletionRules") or []):
        cond = rule.get("condition") if isinstance(rule, dict) else None
        if not isinstance(cond, dict):
            continue
        has_job, has_dep = "jobStatus" in cond, "jobDeploymentStatus" in cond
        if has_job == has_dep:
            got = "both" if has_job else "neither"
            problems.append(f"spec.deletionStrategy.deletionRules[{i}].condition: {got} of jobStatus and "
                            "jobDeploymentStatus set; set exactly one")
    return problems


def _submitter_has_command(spec: dict) -> bool:
    containers = _get(spec.get("submitterPodTemplate"), "spec", "containers") or []
    return bool(containers and isinstance(containers[0], dict) and containers[0].get("command"))


# ---------------------------------------------------------------------------------------------
# Security audit: ftlaunch's own policy for what it renders (not an operator rule)


def security_problems(doc: dict) -> list[str]:
    """Pods that run as root, escalate, use the host network, lack requests/limits or inline secrets."""
    problems = []
    for path, template in _pod_templates(doc):
        pod = template.get("spec") or {}
        if pod.get("hostNetwork"):
            problems.append(f"{path}.spec.hostNetwork: true; remove it")
        if not (pod.get("securityContext") or {}).get("runAsNonRoot"):
            problems.append(f"{path}.spec.securityContext.runAsNonRoot: not true; set it")
        for i, c in enumerate(pod.get("containers") or []):
            problems += _container_problems(c, f"{path}.spec.containers[{i}]")
    options = _get(doc, "spec", "autoscalerOptions") or _get(doc, "spec", "rayClusterSpec", "autoscalerOptions")
    if options:
        problems += _container_problems(options, "autoscalerOptions")
    env_yaml = _get(doc, "spec", "runtimeEnvYAML")
    if env_yaml:
        for key, value in ((yaml.safe_load(env_yaml) or {}).get("env_vars") or {}).items():
            if str(value).startswith("secret:"):
                problems.append(f"spec.runtimeEnvYAML.env_vars.{key}: a secret reference inlined; use a secretKeyRef")
    return problems


def mount_problems(doc: dict) -> list[str]:
    """Paths in a RayJob's plan (storage, data, model folders: every absolute path of its spec) that
    no persistent volume mounted in every Ray pod holds: there they would be missing, or vanish."""
    from launcher.jobplan import PLAN_ENV
    from launcher.k8s.render import is_under

    if doc.get("kind") != "RayJob":
        return []
    try:
        env = (yaml.safe_load(_get(doc, "spec", "runtimeEnvYAML") or "") or {}).get("env_vars") or {}
        spec = json.loads(env[PLAN_ENV])["spec"]
    except (KeyError, TypeError, ValueError, AttributeError, yaml.YAMLError):
        return []  # no ftlaunch plan in it: nothing to check
    mounts = _persistent_mounts(doc)
    where = ", ".join(mounts) or "none"
    return [f"spec.runtimeEnvYAML: {key}: {path} is not on a volume the Ray pods mount (mounted: {where}); "
            "put it on the storage volume or mount its volume there"
            for key, path in _absolute_paths(spec) if not any(is_under(path, m) for m in mounts)]


def _persistent_mounts(doc: dict) -> list[str]:
    """Mount paths of the non-emptyDir volumes that the head and every worker group mount."""
    common = None
    for path, template in _pod_templates(doc):
        if path.startswith("spec.submitterPodTemplate"):
            continue
        pod = template.get("spec") or {}
        kept = {v.get("name") for v in pod.get("volumes") or [] if "emptyDir" not in v}
        mounts = {m.get("mountPath") for c in pod.get("containers") or [] for m in c.get("volumeMounts") or []
                  if m.get("name") in kept}
        common = mounts if common is None else common & mounts
    return sorted(common or ())


def _absolute_paths(node: Any, key: str = "") -> Iterable[tuple[str, str]]:
    """(dotted key, path) for every absolute local path in a resolved spec (`hf:/...` included)."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _absolute_paths(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _absolute_paths(v, f"{key}[{i}]")
    elif isinstance(node, str) and node.removeprefix("hf:").startswith("/"):
        yield key, node.removeprefix("hf:")


def _container_problems(c: dict, path: str) -> list[str]:
    problems = []
    sc = c.get("securityContext") or {}
    if sc.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{path}.securityContext.allowPrivilegeEscalation: not false; set false")
    if sc.get("privileged"):
        problems.append(f"{path}.securityContext.privileged: true; set false")
    res = c.get("resources") or {}
    for part in ("requests", "limits"):
        missing = [r for r in ("cpu", "memory") if r not in (res.get(part) or {})]
        if missing:
            problems.append(f"{path}.resources.{part}: no {', '.join(missing)}; set them")
    for env in c.get("env") or []:
        if "value" in env and str(env["value"]).startswith("secret:"):
            problems.append(f"{path}.env.{env.get('name')}: a secret inlined; use valueFrom.secretKeyRef")
    return problems


def _pod_templates(doc: dict) -> Iterable[tuple[str, dict]]:
    spec = doc.get("spec") or {}
    if doc.get("kind") == "RayJob":
        if spec.get("submitterPodTemplate"):
            yield "spec.submitterPodTemplate", spec["submitterPodTemplate"]
        cluster, where = spec.get("rayClusterSpec") or {}, "spec.rayClusterSpec"
    else:
        cluster, where = spec, "spec"
    if _get(cluster, "headGroupSpec", "template"):
        yield f"{where}.headGroupSpec.template", cluster["headGroupSpec"]["template"]
    for i, group in enumerate(cluster.get("workerGroupSpecs") or []):
        yield f"{where}.workerGroupSpecs[{i}].template", group.get("template") or {}


# ---------------------------------------------------------------------------------------------


def _get(node: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node
