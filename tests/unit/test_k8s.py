"""KubeRay rendering, offline validation, submission (over a fake API server), cluster configs."""

from __future__ import annotations

import argparse
import copy
import glob
import importlib.metadata
import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from launcher.errors import PlanError
from launcher.jobplan import JobPlan
from launcher.k8s import constants
from launcher.k8s.render import k8s_name, render_raycluster, render_rayjob, worker_pods
from launcher.k8s.validate import mount_problems, security_problems, validate_file, validate_manifest

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = Path("/work/shared/kuberay/samples")
# Profiles in the planner's vocabulary (cluster/profiles.py): gpus and cpus are per node.
A100 = {"name": "a100-80g-1", "nodes": 4, "gpus": 1, "gpu_memory_gib": 80,
        "gpu_model": "NVIDIA-A100-SXM4-80GB", "cpus": 12, "memory_gib": 85}
CPU = {"name": "local-cpu", "nodes": 2, "gpus": 0, "gpu_memory_gib": 0,
       "gpu_model": "", "cpus": 4, "memory_gib": 16}


def _examples():
    spec = importlib.util.spec_from_file_location("render_examples", ROOT / "k8s" / "render_examples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _plan(workers=2, gpus=1.0, cpus=4.0, env=None, run_id="tiny-lora-20261128-120000-abc123",
          storage="/mnt/cluster_storage", kind="finetune"):
    return JobPlan(
        run_id=run_id, submission_id=run_id, kind=kind, name="tiny-lora", target="k8s",
        entrypoint="python -m jobs.run --plan-env FTLAUNCH_PLAN", entrypoint_num_cpus=0,
        runtime_env={"py_modules": ["/home/me/ftlaunch/launcher"],
                     "env_vars": {"FTLAUNCH_PLAN": "{}", "A": "1", **(env or {})}},
        resources={"workers": workers, "cpus_per_worker": cpus, "gpus_per_worker": gpus,
                   "total_cpus": workers * cpus, "total_gpus": workers * gpus},
        storage_path=storage, run_dir=f"{storage}/{run_id}", spec={},
    )


def _cluster(doc):
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


# ---------------------------------------------------------------------------------------------
# Rendering


def test_golden_files_match_rendering():
    texts = _examples().texts()
    assert set(texts) == {"raycluster-a100.yaml", "rayjob-finetune.yaml", "rayjob-pipeline.yaml",
                          "rayjob-deepspeed.yaml", "rayjob-multitask.yaml"}
    for name, text in texts.items():
        committed = (ROOT / "k8s" / name).read_text()
        assert committed == text, f"k8s/{name} is stale; run: python k8s/render_examples.py"


@pytest.mark.parametrize("path", sorted(glob.glob(str(ROOT / "k8s" / "*.yaml"))), ids=lambda p: Path(p).name)
def test_committed_manifests_pass_schema_operator_and_security(path):
    assert validate_file(path) == []
    doc = yaml.safe_load(Path(path).read_text())
    assert security_problems(doc) == []
    assert Path(path).read_text().startswith("# kubectl apply -f k8s/")


def test_rayjob_follows_kuberay_recommendations():
    doc = render_rayjob(_plan(env={"HF_TOKEN": "secret:hf-token/token"}), A100, queue="team-a")
    spec = doc["spec"]
    assert spec["entrypoint"] == "python -m jobs.run --plan-env FTLAUNCH_PLAN"
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert "py_modules" not in runtime_env  # local paths mean nothing to the cluster
    assert runtime_env["env_vars"] == {"FTLAUNCH_PLAN": "{}", "A": "1"}  # secret not inlined
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["activeDeadlineSeconds"] > 0 and spec["backoffLimit"] >= 0
    assert spec["suspend"] is True and doc["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert spec["submissionMode"] == "K8sJobMode" and spec["jobId"] == "tiny-lora-20261128-120000-abc123"
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == constants.RAY_VERSION
    assert cluster["enableInTreeAutoscaling"] is False  # Kueue admits fixed-size gangs
    head = cluster["headGroupSpec"]["template"]["spec"]
    worker_group = cluster["workerGroupSpecs"][0]
    worker = worker_group["template"]["spec"]
    assert worker_group["replicas"] == worker_group["minReplicas"] == 2  # 2 workers x 1 GPU, 1 GPU/node
    limits = worker["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1" and worker["containers"][0]["resources"]["requests"] == limits
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in worker["tolerations"]
    assert worker["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert "nvidia.com/gpu" not in head["containers"][0]["resources"]["limits"]
    for pod in (head, worker):
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes[mounts["/mnt/cluster_storage"]]["persistentVolumeClaim"]["claimName"]
        assert "emptyDir" in volumes[mounts["/tmp/ray"]]
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        assert env["HF_TOKEN"] == {"name": "HF_TOKEN",
                                   "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token"}}}
    assert validate_manifest(doc) == [] and security_problems(doc) == []
    assert "secret:hf-token" not in json.dumps(doc["spec"]["rayClusterSpec"])


def test_gpu_profile_uses_gpu_image_and_cpu_profile_has_no_gpu_anything():
    gpu = render_rayjob(_plan(), A100)
    assert gpu["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] \
        == "rayproject/ray:2.60.0-py311-gpu"
    cpu = render_rayjob(_plan(workers=3, gpus=0, cpus=1.5), CPU)
    text = json.dumps(cpu)
    assert "nvidia" not in text and "-gpu" not in text and "tolerations" not in text
    group = cpu["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert group["groupName"] == "cpu-workers" and group["replicas"] == 2  # 2 x 1.5 CPUs fit in 3 CPUs
    assert group["template"]["spec"]["containers"][0]["image"] == "rayproject/ray:2.60.0-py311"
    assert validate_manifest(cpu) == [] and security_problems(cpu) == []


def test_object_storage_gets_no_pvc_and_custom_image_reaches_every_container():
    doc = render_rayjob(_plan(storage="s3://bucket/runs"), A100, image="registry.example/ftlaunch:1")
    assert "persistentVolumeClaim" not in json.dumps(doc)
    images = {c["image"] for _, t in _pods(doc) for c in t["spec"]["containers"]}
    assert images == {"registry.example/ftlaunch:1"}


def _pods(doc):
    from launcher.k8s.validate import _pod_templates

    return list(_pod_templates(doc))


def test_every_pod_is_locked_down():
    for doc in (render_rayjob(_plan(), A100), render_raycluster(A100), render_raycluster(CPU)):
        pods = _pods(doc)
        assert len(pods) >= 2
        for _, template in pods:
            pod = template["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True and not pod.get("hostNetwork")
            for c in pod["containers"]:
                assert c["securityContext"]["allowPrivilegeEscalation"] is False
                assert c["securityContext"]["privileged"] is False
                assert set(c["resources"]["requests"]) >= {"cpu", "memory"}
                assert set(c["resources"]["limits"]) >= {"cpu", "memory"}


def test_security_audit_rejects_a_root_pod_and_an_inlined_secret():
    doc = render_rayjob(_plan(), A100)
    head = doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    head["securityContext"]["runAsNonRoot"] = False
    head["hostNetwork"] = True
    head["containers"][0]["env"] = [{"name": "HF_TOKEN", "value": "secret:x/y"}]
    del head["containers"][0]["resources"]["limits"]
    found = "\n".join(security_problems(doc))
    for word in ("runAsNonRoot", "hostNetwork", "env.HF_TOKEN", "resources.limits"):
        assert word in found


def test_raycluster_autoscales_from_zero_to_profile_nodes():
    doc = render_raycluster(A100)
    group = doc["spec"]["workerGroupSpecs"][0]
    assert (group["minReplicas"], group["replicas"], group["maxReplicas"]) == (0, 0, 4)
    assert doc["spec"]["enableInTreeAutoscaling"] is True
    assert doc["metadata"]["name"] == "ftlaunch-a100-80g-1"
    assert validate_manifest(doc) == []


def test_names_are_dns_1035_and_short_enough():
    long_id = "9" + "x" * 39 + "-20261128-120000-abcdef"
    name = k8s_name(long_id)
    assert len(name) <= 47 and name[0].isalpha() and name == name.lower()
    assert k8s_name(long_id) != k8s_name(long_id.replace("abcdef", "abcdeg"))  # hash keeps them apart
    assert k8s_name("Tiny_LoRA.run") == "tiny-lora-run"
    doc = render_rayjob(_plan(run_id=long_id), A100)
    assert validate_manifest(doc) == []


def test_unschedulable_plans_are_refused():
    with pytest.raises(PlanError, match="no GPUs"):
        worker_pods(CPU, _plan(gpus=1).resources)
    with pytest.raises(PlanError, match="nodes"):
        worker_pods(A100, _plan(workers=5).resources)
    with pytest.raises(PlanError, match="exceeds"):
        worker_pods(A100, _plan(gpus=2).resources)
    with pytest.raises(PlanError, match="secret:NAME/KEY"):
        render_rayjob(_plan(env={"T": "secret:only-name"}), A100)
    with pytest.raises(PlanError, match="submission mode"):
        render_rayjob(_plan(), A100, submission_mode="Batch")


def test_ray_version_constant_matches_the_pinned_ray():
    assert constants.RAY_VERSION == importlib.metadata.version("ray")
    assert f"ray[default]=={constants.RAY_VERSION}" in (ROOT / "pyproject.toml").read_text()


# ---------------------------------------------------------------------------------------------
# Validation: samples pass, each rule rejects its bad manifest


@pytest.mark.parametrize("path", sorted(p for p in SAMPLES.glob("*.yaml") if not p.name.startswith("ray-service")),
                         ids=lambda p: p.name)
def test_official_samples_pass(path):
    # RayService samples are skipped: ftlaunch validates only RayJob and RayCluster.
    assert validate_file(str(path)) == []


def _job():
    return render_rayjob(_plan(), A100)


def _set(doc, dotted, value):
    node = doc
    *parents, last = dotted.split(".")
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value


_DELETE = object()
W0 = "spec.rayClusterSpec.workerGroupSpecs.0"
BAD = [
    ("unknown field", "spec.entrypont", "x", "spec.entrypont: unknown field; did you mean 'entrypoint'"),
    ("unknown nested field", f"{W0}.template.spec.containers.0.imagee", "x", "containers[0].imagee: unknown field"),
    ("wrong type", f"{W0}.replicas", "two", "workerGroupSpecs[0].replicas: 'two' is not of type integer"),
    ("bad quantity", f"{W0}.template.spec.containers.0.resources.limits.cpu", "lots", "limits.cpu: 'lots' does not match"),
    ("enum", "spec.rayClusterSpec.autoscalerOptions.upscalingMode", "Fast", "upscalingMode: 'Fast' is not allowed"),
    ("int32 range", "spec.activeDeadlineSeconds", 2**40, "activeDeadlineSeconds: 1099511627776 is out of the int32"),
    ("required", f"{W0}.groupName", _DELETE, "workerGroupSpecs[0].groupName: required field is missing"),
    ("api version", "apiVersion", "ray.io/v1alpha1", "apiVersion: 'ray.io/v1alpha1'"),
    ("name too long", "metadata.name", "a" * 48, "has 48 characters; the operator allows at most 47"),
    ("name not DNS-1035", "metadata.name", "1job", "not a DNS-1035 label"),
    ("entrypoint missing", "spec.entrypoint", _DELETE, "spec.entrypoint: missing with submissionMode K8sJobMode"),
    ("submission mode", "spec.submissionMode", "BatchMode", "spec.submissionMode: 'BatchMode' is unknown"),
    ("ttl without shutdown", "spec.shutdownAfterJobFinishes", False, "ttlSecondsAfterFinished: 600 needs spec.shutdownAfterJobFinishes"),
    ("negative ttl", "spec.ttlSecondsAfterFinished", -1, "ttlSecondsAfterFinished: -1 is negative"),
    ("deadline not positive", "spec.activeDeadlineSeconds", 0, "activeDeadlineSeconds: 0 must be positive"),
    ("negative backoff", "spec.backoffLimit", -1, "backoffLimit: -1 is negative"),
    ("runtime env not YAML", "spec.runtimeEnvYAML", "env_vars: [unclosed", "runtimeEnvYAML: does not parse as YAML"),
    ("runtime env not a mapping", "spec.runtimeEnvYAML", "- a\n- b\n", "runtimeEnvYAML: ['a', 'b'] is not a YAML mapping"),
    ("entrypointResources not JSON", "spec.entrypointResources", "{custom: 1}", "entrypointResources: '{custom: 1}' is not JSON"),
    ("entrypointResources not object", "spec.entrypointResources", "[1]", "not a JSON object of numbers"),
    ("runtime env given as a mapping", "spec.runtimeEnvYAML", {"pip": ["x"]},
     "runtimeEnvYAML: a dict given ({'pip': ['x']}); the CRD wants it as one YAML string"),
    ("entrypointResources given as a mapping", "spec.entrypointResources", {"custom": 1},
     "entrypointResources: a dict given"),
    ("managedBy", "spec.managedBy", "me", "spec.managedBy: 'me' is not allowed"),
    ("min > max", f"{W0}.minReplicas", 5, "minReplicas: 5 exceeds maxReplicas 4"),
    ("replicas out of range", f"{W0}.replicas", 9, "replicas: 9 is outside [minReplicas 2, maxReplicas 4]"),
    ("negative min", f"{W0}.minReplicas", -1, "minReplicas: -1 is negative"),
    ("no containers", f"{W0}.template.spec.containers", [], "template.spec.containers: empty"),
    ("rayStartParams labels", f"{W0}.rayStartParams", {"labels": "a=b"}, "rayStartParams.labels: not allowed"),
    ("resources twice", "spec.rayClusterSpec.headGroupSpec.resources", {"CPU": "1"}, "num-cpus set together with"),
    ("rayStartParams not strings", "spec.rayClusterSpec.headGroupSpec.rayStartParams.num-cpus", 0, "num-cpus: 0 is not of type string"),
]


@pytest.mark.parametrize("field,value,expected", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_rule_rejects(field, value, expected):
    doc = _job()
    _set(doc, field, value)
    problems = validate_manifest(doc)
    assert any(expected in p for p in problems), problems
    assert all("\n" not in p and ";" in p for p in problems)  # one line each, with a fix


def test_rules_between_fields():
    def check(mutate, expected):
        doc = _job()
        mutate(doc["spec"])
        problems = validate_manifest(doc)
        assert any(expected in p for p in problems), problems

    selector = {"ray.io/cluster": "c"}
    check(lambda s: s.update(clusterSelector=selector), "both are set; set exactly one")
    check(lambda s: s.pop("rayClusterSpec"), "neither is set")
    check(lambda s: (s.pop("rayClusterSpec"), s.update(clusterSelector=selector, backoffLimit=1)),
          "backoffLimit: 1 is not allowed with clusterSelector")
    check(lambda s: (s.pop("rayClusterSpec"), s.update(clusterSelector=selector, suspend=True, backoffLimit=0)),
          "suspend: true is not allowed with spec.clusterSelector")
    check(lambda s: s.update(suspend=True, shutdownAfterJobFinishes=False, ttlSecondsAfterFinished=0),
          "suspend: true needs spec.shutdownAfterJobFinishes")
    check(lambda s: s.update(submissionMode="InteractiveMode", backoffLimit=2),
          "not allowed with InteractiveMode")
    check(lambda s: s.update(submissionMode="SidecarMode"), "submitterPodTemplate: not allowed with submissionMode SidecarMode")
    check(lambda s: (s.update(submissionMode="SidecarMode"), s.pop("submitterPodTemplate"),
                     s["rayClusterSpec"]["headGroupSpec"]["template"]["spec"].update(restartPolicy="Always")),
          "restartPolicy: 'Always' is not allowed with SidecarMode")
    rules = {"deletionRules": [{"policy": "DeleteCluster", "condition": {"jobStatus": "FAILED"}}]}
    check(lambda s: s.update(deletionStrategy=rules), "deletionStrategy: not allowed with shutdownAfterJobFinishes")
    check(lambda s: s.update(deletionStrategy={"onSuccess": {"policy": "DeleteCluster"}}, shutdownAfterJobFinishes=False,
                             ttlSecondsAfterFinished=0), "needs both onSuccess and onFailure")
    both = {"deletionRules": [{"policy": "DeleteCluster", "condition": {"jobStatus": "FAILED", "jobDeploymentStatus": "Failed"}}]}
    check(lambda s: s.update(deletionStrategy=both, shutdownAfterJobFinishes=False, ttlSecondsAfterFinished=0),
          "both of jobStatus and jobDeploymentStatus set")


HEAD_POD = "spec.rayClusterSpec.headGroupSpec.template.spec"


def _pod(doc, dotted=HEAD_POD):
    node = doc
    for part in dotted.split("."):
        node = node[part]
    return node


REPEATS = [  # (what, mutate the rendered job, expected line)
    ("two containers named alike", lambda d: _pod(d)["containers"].append(copy.deepcopy(_pod(d)["containers"][0])),
     "containers[1]: name='ray-head' repeats spec.rayClusterSpec.headGroupSpec.template.spec.containers[0]"),
    ("an env var twice", lambda d: _pod(d)["containers"][0].setdefault("env", []).extend(
        [{"name": "X", "value": "1"}, {"name": "X", "value": "2"}]), "name='X' repeats"),
    ("two mounts at one path", lambda d: _pod(d)["containers"][0]["volumeMounts"].append(
        dict(_pod(d)["containers"][0]["volumeMounts"][0], name="other")), "must be unique by mountPath"),
    ("a port twice, protocol defaulted", lambda d: _pod(d)["containers"][0].__setitem__(
        "ports", [{"containerPort": 6379}, {"containerPort": 6379, "protocol": "TCP"}]),
     "containerPort=6379, protocol='TCP' repeats"),
    ("two volumes named alike", lambda d: _pod(d)["volumes"].append(dict(_pod(d)["volumes"][0])),
     "name='ray-logs' repeats"),
    ("a map item without its key", lambda d: _pod(d)["containers"][0].setdefault("env", []).append({"value": "1"}),
     "no name; every item of"),
]


@pytest.mark.parametrize("mutate,expected", [r[1:] for r in REPEATS], ids=[r[0] for r in REPEATS])
def test_list_map_items_must_be_unique_by_their_keys(mutate, expected):
    """x-kubernetes-list-type map/set, read from the v1.7.0 schema wherever it appears: what the
    apiserver rejects and a JSON Schema check alone lets through."""
    doc = _job()
    assert validate_manifest(doc) == []
    mutate(doc)
    problems = validate_manifest(doc)
    assert any(expected in p for p in problems), problems
    assert all("\n" not in p and ":" in p for p in problems)


def _keyed_lists(schema, path=()):
    """Every (path, list schema) whose x-kubernetes-list-type is map or set, anywhere in a schema."""
    if schema.get("x-kubernetes-list-type") in ("map", "set"):
        yield path, schema
    for name, sub in (schema.get("properties") or {}).items():
        yield from _keyed_lists(sub, path + (name,))
    if isinstance(schema.get("items"), dict):
        yield from _keyed_lists(schema["items"], path + (0,))


def _key_item(sub):
    """An item of a keyed list: its map keys filled in (a set's: a value)."""
    if sub["x-kubernetes-list-type"] == "set":
        return "a" if sub["items"].get("type") == "string" else 1
    return {k: 1 if sub["items"]["properties"][k].get("type") == "integer" else "a"
            for k in sub.get("x-kubernetes-list-map-keys") or []}


def _document_at(schema, path, leaf):
    """The smallest document holding `leaf` at `path` (names: mappings; 0: one-item lists, whose
    item carries its list's map keys where the list on the way is itself keyed)."""
    if not path:
        return leaf
    head, rest = path[0], path[1:]
    if head == 0:
        item = _document_at(schema["items"], rest, leaf)
        if schema.get("x-kubernetes-list-type") == "map" and isinstance(item, dict):
            item = {**_key_item(schema), **item}
        return [item]
    return {head: _document_at(schema["properties"][head], rest, leaf)}


@pytest.mark.parametrize("kind", ["RayJob", "RayCluster"])
def test_every_keyed_list_in_the_schemas_rejects_a_repeat(kind):
    """Not only the lists the samples use: each list-map and set of the v1.7.0 schema, found by
    walking it, gets two items with the same key (or value), and the repeat is named."""
    from launcher.k8s.schema import _raw_schema, list_key_problems

    schema = _raw_schema(kind)
    found = list(_keyed_lists(schema))
    assert len(found) > 50  # containers, env, ports, volumes, ... in every pod template
    for path, sub in found:
        item = _key_item(sub)
        problems = list_key_problems(_document_at(schema, path, [item, copy.deepcopy(item)]), schema)
        assert len(problems) == 1 and "repeats" in problems[0], (path, problems)
        assert list_key_problems(_document_at(schema, path, [item]), schema) == [], path


def test_list_map_items_with_distinct_keys_pass():
    doc = _job()
    _pod(doc)["containers"][0]["ports"] = [{"containerPort": 6379}, {"containerPort": 6379, "protocol": "UDP"}]
    assert validate_manifest(doc) == []


def test_interactive_mode_and_own_submitter_command_need_no_entrypoint():
    doc = _job()
    doc["spec"].pop("entrypoint")
    doc["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["command"] = ["ray", "job", "submit"]
    assert validate_manifest(doc) == []
    doc["spec"].update(submissionMode="InteractiveMode", backoffLimit=0)
    doc["spec"].pop("submitterPodTemplate")
    assert validate_manifest(doc) == []


def test_defaults_and_null_pruning_are_applied_before_checking():
    doc = _job()
    group = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    del group["minReplicas"], group["maxReplicas"]  # CRD defaults 0 and 2147483647
    doc["spec"]["jobId"] = None  # pruned like the apiserver does
    original = copy.deepcopy(doc)
    assert validate_manifest(doc) == []
    assert doc == original  # validation does not mutate its input


def test_raycluster_metadata_and_generate_name():
    doc = render_raycluster(A100)
    doc["metadata"]["name"] = "c" * 54
    assert any("at most 53" in p for p in validate_manifest(doc))
    job = _job()
    del job["metadata"]["name"]
    job["metadata"]["generateName"] = "g" * 43
    assert any("generateName" in p for p in validate_manifest(job))
    assert validate_manifest({"kind": "RayService"}) == ["kind: 'RayService' is not supported; use RayJob or RayCluster"]


# ---------------------------------------------------------------------------------------------
# Submission. No Kubernetes runs here: a fake API server stands in, behind the real client
# objects (ApiClient, CustomObjectsApi); only the HTTP pool manager is replaced.


class _Reply:
    def __init__(self, status, body):
        self.status, self.reason = status, {200: "OK", 201: "Created", 404: "Not Found", 409: "Conflict"}[status]
        self.data = json.dumps(body).encode()
        self.headers = {"content-type": "application/json"}

    def getheaders(self):
        return self.headers

    def getheader(self, name, default=None):
        return self.headers.get(name, default)


class _FakeApiServer:
    def __init__(self, *replies):
        self.replies, self.calls = list(replies), []

    def request(self, method, url, body=None, **kwargs):
        self.calls.append({"method": method, "url": url, "body": json.loads(body) if body else None})
        return self.replies.pop(0)

    def clear(self):
        pass


def _api_client(server):
    from kubernetes import client

    api = client.ApiClient(client.Configuration(host="https://k8s.invalid"))
    api.rest_client.pool_manager = server
    return api


def test_submit_creates_the_rayjob_through_custom_objects_api():
    from launcher.k8s.submit import submit_rayjob

    manifest = _job()
    server = _FakeApiServer(_Reply(201, {**manifest, "metadata": {**manifest["metadata"], "uid": "u1"}}))
    result = submit_rayjob(manifest, api_client=_api_client(server))
    assert result["mode"] == "created" and result["object"]["metadata"]["uid"] == "u1"
    [call] = server.calls
    assert call["method"] == "POST"
    assert call["url"] == "https://k8s.invalid/apis/ray.io/v1/namespaces/default/rayjobs"
    assert call["body"] == manifest


def test_submit_reports_an_existing_rayjob_and_a_missing_crd():
    from launcher.errors import ClusterError, SubmissionError
    from launcher.k8s.submit import submit_rayjob

    server = _FakeApiServer(_Reply(409, {"message": "already exists"}), _Reply(404, {"message": "nf"}))
    with pytest.raises(SubmissionError, match="already exists; delete it"):
        submit_rayjob(_job(), api_client=_api_client(server))
    with pytest.raises(ClusterError, match="install the KubeRay operator"):
        submit_rayjob(_job(), api_client=_api_client(server))


def test_submit_without_kubeconfig_writes_the_manifest(tmp_path, monkeypatch):
    from launcher.k8s.submit import submit_rayjob

    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    monkeypatch.setenv("HOME", str(tmp_path))
    result = submit_rayjob(_job(), out_dir=str(tmp_path / "out"))
    assert result["mode"] == "file"
    assert result["command"] == f"kubectl apply -f {result['path']}"
    assert yaml.safe_load(Path(result["path"]).read_text()) == _job()


def test_rayjob_status_reads_both_statuses():
    from launcher.k8s.submit import rayjob_status

    body = {"status": {"jobStatus": "RUNNING", "jobDeploymentStatus": "Running", "rayClusterName": "c-1"}}
    server = _FakeApiServer(_Reply(200, body), _Reply(200, {"status": {"jobStatus": "FAILED",
                                                                        "jobDeploymentStatus": "Failed"}}))
    status = rayjob_status("job-a", "team", _api_client(server))
    assert (status["job_status"], status["deployment_status"], status["terminal"]) == ("RUNNING", "Running", False)
    assert server.calls[0]["method"] == "GET"
    assert server.calls[0]["url"] == "https://k8s.invalid/apis/ray.io/v1/namespaces/team/rayjobs/job-a"
    assert rayjob_status("job-a", "team", _api_client(server))["terminal"] is True


def test_missing_kubernetes_names_the_extra(monkeypatch):
    import sys

    from launcher.errors import MissingExtraError
    from launcher.k8s.submit import rayjob_status

    monkeypatch.setitem(sys.modules, "kubernetes", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'ftlaunch\[k8s\]'"):
        rayjob_status("a", "b", object())


# ---------------------------------------------------------------------------------------------
# Cluster launcher YAML and the CLI verbs


def test_gpu_cloud_cluster_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster" / "gpu-cloud.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))  # raises on a schema violation
    workers = config["available_node_types"]["a100-80g-x8"]
    assert workers["resources"]["GPU"] == 8 and workers["min_workers"] < workers["max_workers"]
    assert config["docker"]["image"] == f"rayproject/ray:{constants.RAY_VERSION}-py311-gpu"
    broken = copy.deepcopy(config)
    broken["available_node_types"]["head"]["min_wrkers"] = 0
    with pytest.raises(Exception, match="min_wrkers"):
        validate_config(prepare_config(broken))


def _cli(module, argv):
    parser = argparse.ArgumentParser(prog="ftlaunch")
    module.add_parser(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_render_writes_a_valid_rayjob(tmp_path, capsys):
    from launcher.cli import render as render_verb

    spec = dict(_examples().LORA_SPEC, storage="runs")  # on the volume, beside the data
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    (tmp_path / "profile.yaml").write_text(yaml.safe_dump(A100))
    out = tmp_path / "job.yaml"
    code = _cli(render_verb, ["render", "k8s", str(tmp_path / "spec.yaml"), "train.max_steps=5",
                              "--profile", str(tmp_path / "profile.yaml"), "--out", str(out), "--queue", "q",
                              "--image", "registry.example/ftlaunch:1"])
    assert code == 0
    doc = yaml.safe_load(out.read_text())
    assert doc["spec"]["suspend"] is True and validate_manifest(doc) == []
    plan_env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])["env_vars"]["FTLAUNCH_PLAN"]
    assert json.loads(plan_env)["spec"]["train"]["max_steps"] == 5
    assert "kubectl apply -f" in capsys.readouterr().err


def test_cli_validate_k8s_exit_codes(tmp_path, capsys):
    from launcher.cli import validate_k8s

    good = str(ROOT / "k8s" / "rayjob-finetune.yaml")
    assert _cli(validate_k8s, ["validate-k8s", good, "--strict"]) == 0
    doc = yaml.safe_load(Path(good).read_text())
    doc["spec"]["ttlSecondsAfterFinished"] = -5
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    assert _cli(validate_k8s, ["validate-k8s", good, str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}: spec.ttlSecondsAfterFinished: -5 is negative" in err


# ---------------------------------------------------------------------------------------------
# render k8s from a user's spec: data and runs on mounted volumes, an explicit profile and image

DEMO = ROOT / "configs" / "tiny" / "lora.yaml"  # a built-in model: nothing to mount but data
IMAGE = "registry.example/ftlaunch:1"


def _render(tmp_path, capsys, *args):
    from launcher.cli.main import main

    out = tmp_path / "rayjob.yaml"
    code = main(["render", "k8s", str(DEMO), *args, "--out", str(out)])
    return code, (yaml.safe_load(out.read_text()) if out.exists() else None), capsys.readouterr().err


def test_render_mounts_the_volume_where_relative_data_and_runs_both_resolve(tmp_path, capsys):
    code, doc, err = _render(tmp_path, capsys, "--profile", "cpu-8", "--image", IMAGE)
    assert code == 0, err
    env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])["env_vars"]
    spec = json.loads(env["FTLAUNCH_PLAN"])["spec"]
    assert spec["data"]["train"] == f"{constants.STORAGE_MOUNT}/data/demo/train.parquet"
    assert spec["storage"] == f"{constants.STORAGE_MOUNT}/runs"
    for template in (_cluster(doc)["headGroupSpec"]["template"], _cluster(doc)["workerGroupSpecs"][0]["template"]):
        mounts = {m["name"]: m["mountPath"] for m in template["spec"]["containers"][0]["volumeMounts"]}
        assert mounts["storage"] == constants.STORAGE_MOUNT  # was .../runs: the data was off the volume
    assert mount_problems(doc) == []
    # A CPU profile for a 0-GPU spec: no GPU, no GPU image, no /dev/shm sized for NCCL.
    worker = _cluster(doc)["workerGroupSpecs"][0]["template"]["spec"]
    assert "nvidia.com/gpu" not in worker["containers"][0]["resources"]["limits"]
    assert "dshm" not in {v["name"] for v in worker["volumes"]}
    assert f"next: kubectl apply -f {tmp_path / 'rayjob.yaml'}" in err


def test_render_refuses_a_dataset_on_no_mounted_volume(tmp_path, capsys):
    code, doc, err = _render(tmp_path, capsys, "data.train=/data/demo/train.parquet", "--profile", "cpu-8",
                             "--image", IMAGE)
    assert code == 1 and doc is None
    assert ("ftlaunch: error: spec.runtimeEnvYAML: data.train: /data/demo/train.parquet is not on a volume the "
            "Ray pods mount (mounted: /mnt/cluster_storage)") in err


def test_render_needs_an_explicit_profile_and_an_image_with_ftlaunch(tmp_path, capsys):
    code, doc, err = _render(tmp_path, capsys, "--image", IMAGE)
    assert code == 1 and doc is None and "ftlaunch: error: Kubernetes needs --profile: " in err
    code, doc, err = _render(tmp_path, capsys, "--profile", "cpu-8")
    assert code == 1 and doc is None
    assert "ftlaunch: error: Kubernetes needs --image: the default rayproject/ray:2.60.0-py311 lacks" in err
    assert "--allow-default-image" in err
    # Allowed explicitly: rendered, but no `kubectl apply` hint for a job that would fail at start.
    code, doc, err = _render(tmp_path, capsys, "--profile", "cpu-8", "--allow-default-image")
    assert code == 0 and doc["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["image"].startswith("rayproject/")
    assert "kubectl apply" not in err and "the default image does not contain ftlaunch" in err


def test_validate_k8s_strict_catches_data_off_the_mounted_volumes(tmp_path, capsys):
    from launcher.cli.main import main

    code, doc, err = _render(tmp_path, capsys, "--profile", "cpu-8", "--image", IMAGE)
    for template in (_cluster(doc)["headGroupSpec"]["template"], _cluster(doc)["workerGroupSpecs"][0]["template"]):
        for mount in template["spec"]["containers"][0]["volumeMounts"]:
            if mount["name"] == "storage":
                mount["mountPath"] = f"{constants.STORAGE_MOUNT}/runs"  # what render used to write
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump(doc))
    assert main(["validate-k8s", str(old)]) == 0  # the schema and the operator accept it
    capsys.readouterr()
    assert main(["validate-k8s", "--strict", str(old)]) == 1
    err = capsys.readouterr().err
    assert (f"{old}: spec.runtimeEnvYAML: data.train: /mnt/cluster_storage/data/demo/train.parquet is not on a "
            "volume the Ray pods mount (mounted: /mnt/cluster_storage/runs)") in err
    assert "data.eval: " in err and "storage: " not in err  # the run folder is on that volume
