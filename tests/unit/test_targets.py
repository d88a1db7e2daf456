"""Targets behind one interface: the registry, each target's plan rules, and the k8s target's job
verbs. No Kubernetes API server runs here: a fake one stands in behind the real `kubernetes`
client objects (ApiClient, CustomObjectsApi, CoreV1Api); only the HTTP pool manager is replaced,
so the URLs, methods and bodies asserted are those the real client sends."""

from __future__ import annotations

import json
import urllib.parse

import pytest
import yaml

import launcher
from launcher.cli.main import main
from launcher.errors import ConfigError, PlanError, SubmissionError
from launcher.jobplan import plan
from launcher.k8s import constants
from launcher.spec import load_spec
from launcher.targets import TARGETS, Target, get_target, register_target
from launcher.targets.k8s import load_profile

RAYJOBS = "https://k8s.invalid/apis/ray.io/v1/namespaces/team/rayjobs"
SPEC = {"kind": "finetune", "name": "tgt", "strategy": {"type": "lora", "r": 4},
        "data": {"train": "data/train.parquet"}, "train": {"max_steps": 5}, "storage": "runs"}


class _Reply:
    def __init__(self, status, body, content_type="application/json"):
        self.status = status
        self.reason = {200: "OK", 201: "Created", 404: "Not Found"}[status]
        self.data = (body if isinstance(body, str) else json.dumps(body)).encode()
        self.headers = {"content-type": content_type}

    def getheaders(self):
        return self.headers

    def getheader(self, name, default=None):
        return self.headers.get(name, default)


class FakeApiServer:
    """Answers by (method, path); a list of replies is served in order. Records every call."""

    def __init__(self, routes):
        self.routes, self.calls = routes, []

    def request(self, method, url, body=None, **kwargs):
        parts = urllib.parse.urlsplit(url)
        self.calls.append((method, f"{parts.scheme}://{parts.netloc}{parts.path}",
                           urllib.parse.parse_qs(parts.query), json.loads(body) if body else None))
        reply = self.routes.get((method, f"{parts.scheme}://{parts.netloc}{parts.path}"))
        if isinstance(reply, list):
            reply = reply.pop(0) if len(reply) > 1 else reply[0]
        return reply or _Reply(404, {"message": "not found"})

    def clear(self):
        pass

    def methods(self):
        return [(m, u.rsplit("/", 1)[-1]) for m, u, _, _ in self.calls]


def api_client(server):
    from kubernetes import client

    api = client.ApiClient(client.Configuration(host="https://k8s.invalid"))
    api.rest_client.pool_manager = server
    return api


def rayjob(name="job-a", job="RUNNING", deployment="Running", mode="K8sJobMode",
           created="2026-01-02T00:00:00Z"):
    runtime_env = yaml.safe_dump({"env_vars": {"FTLAUNCH_PLAN": json.dumps({"name": f"spec-{name}"})}})
    labels = {"app.kubernetes.io/name": "ftlaunch", "app.kubernetes.io/component": "finetune"}
    return {"apiVersion": "ray.io/v1", "kind": "RayJob",
            "metadata": {"name": name, "namespace": "team", "creationTimestamp": created, "labels": labels,
                         "annotations": {"ftlaunch/run-dir": f"/mnt/cluster_storage/runs/{name}"}},
            "spec": {"submissionMode": mode, "runtimeEnvYAML": runtime_env},
            "status": {"jobStatus": job, "jobDeploymentStatus": deployment, "message": "m"}}


# ---------------------------------------------------------------------------------------------
# The registry


def test_registry_names_every_target_once_and_refuses_a_duplicate():
    assert TARGETS == ("local", "ray", "k8s")
    assert all(isinstance(get_target(name), Target) for name in TARGETS)
    with pytest.raises(RuntimeError, match="target 'ray' is registered twice"):
        register_target(get_target("ray"))
    with pytest.raises(PlanError, match="target 'locl' is unknown; did you mean 'local'"):
        get_target("locl")
    with pytest.raises(PlanError, match="target 'moon' is unknown; use one of: local, ray, k8s"):
        plan(load_spec(SPEC), "moon", preflight=False)


# ---------------------------------------------------------------------------------------------
# Plan rules: plan() asks the target


def test_relative_paths_resolve_on_the_cluster_volume_for_k8s_and_the_cwd_elsewhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    on_k8s = plan(load_spec(SPEC), "k8s", preflight=False)
    assert on_k8s.spec["data"]["train"] == f"{constants.STORAGE_MOUNT}/data/train.parquet"
    assert on_k8s.storage_path == f"{constants.STORAGE_MOUNT}/runs"
    on_ray = plan(load_spec(SPEC), "ray", preflight=False)
    assert on_ray.spec["data"]["train"] == f"{tmp_path}/data/train.parquet"
    assert any("shared filesystem" in w for w in on_ray.warnings)
    local = plan(load_spec(SPEC), "local", preflight=False)
    assert not any("shared filesystem" in w for w in local.warnings)  # checked here instead


def test_local_storage_is_checked_on_this_machine_and_remote_storage_is_not(tmp_path):
    a_file = tmp_path / "f"
    a_file.write_text("x")
    spec = load_spec({**SPEC, "storage": str(a_file)})
    with pytest.raises(PlanError, match="is a file, not a folder"):
        plan(spec, "local", preflight=False)
    assert plan(spec, "ray", preflight=False).storage_path == str(a_file)


def test_each_target_refuses_the_reference_kind_it_cannot_resolve():
    secret = load_spec({**SPEC, "env": {"HF_TOKEN": "secret:hf/token"}})
    env = load_spec({**SPEC, "env": {"HF_TOKEN": "env:HF_TOKEN"}})
    for target in ("local", "ray"):
        with pytest.raises(PlanError, match=f"a Kubernetes Secret; on target {target} use env:HF_TOKEN"):
            plan(secret, target, preflight=False)
        assert plan(env, target, preflight=False)
    with pytest.raises(PlanError, match="reads the cluster's environment; on Kubernetes use secret:NAME/KEY"):
        plan(env, "k8s", preflight=False)
    assert plan(secret, "k8s", preflight=False)
    broken = load_spec({**SPEC, "env": {"HF_TOKEN": "secret:only-name"}})
    with pytest.raises(PlanError, match=r"env.HF_TOKEN: 'secret:only-name' is not secret:NAME/KEY"):
        plan(broken, "k8s", preflight=False)


def test_default_profile_is_this_machine_for_local_only():
    assert get_target("local").default_profile(0) == "local-cpu"
    assert get_target("ray").default_profile(1) is None
    assert get_target("k8s").default_profile(1) is None


# ---------------------------------------------------------------------------------------------
# One profile vocabulary


def test_a_profile_is_the_planners_by_name_and_a_file_uses_its_keys(tmp_path):
    from cluster.profiles import get_profile

    assert load_profile("a100-80g-1") == get_profile("a100-80g-1")
    # No silent default: a 0-GPU spec once got an A100 worker with 11 CPUs and a 153Gi /dev/shm.
    with pytest.raises(ConfigError, match=r"^Kubernetes needs --profile: .* one of a100-40g-1, .*cpu-8"):
        load_profile(None)
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump({"name": "x", "nodes": 1, "gpus_per_node": 1, "cpus_per_node": 8,
                                   "gpu_memory_gib": 80, "gpu_model": "A100", "memory_gib": 64}))
    with pytest.raises(ConfigError, match=f"--profile {old}: missing gpus, cpus; add them"):
        load_profile(str(old))


# ---------------------------------------------------------------------------------------------
# The k8s target's verbs, over the fake API server


def test_python_submit_to_k8s_creates_the_rayjob_and_tracks_it():
    server = FakeApiServer({("POST", RAYJOBS): _Reply(201, {}),
                            ("GET", f"{RAYJOBS}/tgt-k8s-1"): _Reply(200, rayjob("tgt-k8s-1"))})
    handle = launcher.submit(SPEC, target="k8s", submission_id="tgt-k8s-1", namespace="team",
                             api_client=api_client(server), overrides=("resources.workers=1",),
                             profile="a100-80g-1", image="registry.example/ftlaunch:1")
    (method, url, _, body), = server.calls
    assert (method, url) == ("POST", RAYJOBS)
    assert body["kind"] == "RayJob" and body["metadata"]["name"] == "tgt-k8s-1"
    assert body["spec"]["jobId"] == "tgt-k8s-1"
    assert handle.submitted_lines() == [
        "created RayJob team/tgt-k8s-1", "next:",
        "  ftlaunch status tgt-k8s-1 --target k8s --namespace team",
        "  kubectl get rayjob -n team tgt-k8s-1"]
    assert handle.status() == "RUNNING" and handle.follows is False


def test_python_submit_to_k8s_without_kubeconfig_writes_the_manifest(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    monkeypatch.setenv("HOME", str(tmp_path))
    handle = launcher.submit(SPEC, target="k8s", submission_id="tgt-file", out_dir=str(tmp_path),
                             profile="cpu-8", image="registry.example/ftlaunch:1")
    path = tmp_path / "tgt-file.yaml"
    assert yaml.safe_load(path.read_text())["metadata"]["name"] == "tgt-file"
    assert handle.submitted_lines()[1] == f"next: kubectl apply -f {path}"
    with pytest.raises(SubmissionError, match=f"not created; apply it with: kubectl apply -f {path}"):
        handle.status()


def test_stop_deletes_a_running_rayjob_and_wait_sees_it_gone():
    name = f"{RAYJOBS}/job-a"
    server = FakeApiServer({("GET", name): [_Reply(200, rayjob()), _Reply(200, rayjob()), _Reply(404, {})],
                            ("DELETE", name): _Reply(200, {"status": "Success"})})
    handle = get_target("k8s").attach("job-a", namespace="team", api_client=api_client(server))
    assert handle.run_dir == "/mnt/cluster_storage/runs/job-a"
    assert handle.stop() is True
    assert handle.wait(poll=0) == "STOPPED"
    assert server.methods() == [("GET", "job-a"), ("GET", "job-a"), ("DELETE", "job-a"), ("GET", "job-a")]


def test_stop_leaves_a_finished_rayjob_alone():
    done = rayjob(job="SUCCEEDED", deployment="Complete")
    server = FakeApiServer({("GET", f"{RAYJOBS}/job-a"): _Reply(200, done)})
    handle = get_target("k8s").attach("job-a", namespace="team", api_client=api_client(server))
    assert handle.stop() is False and handle.status() == "SUCCEEDED"
    assert "DELETE" not in [m for m, *_ in server.calls]


def test_list_selects_ftlaunch_rayjobs_oldest_first():
    items = [rayjob("job-b", created="2026-01-03T00:00:00Z"),
             rayjob("job-a", job="", deployment="Failed", created="2026-01-01T00:00:00Z")]
    server = FakeApiServer({("GET", RAYJOBS): _Reply(200, {"items": items})})
    rows = get_target("k8s").list(namespace="team", api_client=api_client(server))
    (_, _, query, _), = server.calls
    assert query == {"labelSelector": ["app.kubernetes.io/name=ftlaunch"]}
    assert [(r["submission_id"], r["status"], r["kind"], r["name"]) for r in rows] == [
        ("job-a", "FAILED", "finetune", "spec-job-a"), ("job-b", "RUNNING", "finetune", "spec-job-b")]


def test_logs_read_the_submitter_pod_found_by_its_job_name_label():
    pods = "https://k8s.invalid/api/v1/namespaces/team/pods"
    server = FakeApiServer({
        ("GET", f"{RAYJOBS}/job-a"): _Reply(200, rayjob()),
        ("GET", pods): _Reply(200, {"items": [
            {"metadata": {"name": "job-a-old", "creationTimestamp": "2026-01-01T00:00:00Z"}},
            {"metadata": {"name": "job-a-new", "creationTimestamp": "2026-01-02T00:00:00Z"}}]}),
        ("GET", f"{pods}/job-a-new/log"): _Reply(200, "step 1 loss 2.0\n", "text/plain"),
    })
    handle = get_target("k8s").attach("job-a", namespace="team", api_client=api_client(server))
    assert handle.logs() == "step 1 loss 2.0\n"
    assert [q for m, u, q, _ in server.calls if u == pods] == [{"labelSelector": ["job-name=job-a"]}]


def test_logs_without_a_submitter_pod_are_refused_with_the_kubectl_command():
    pods = "https://k8s.invalid/api/v1/namespaces/team/pods"
    server = FakeApiServer({("GET", f"{RAYJOBS}/job-a"): _Reply(200, rayjob()),
                            ("GET", f"{RAYJOBS}/job-h"): _Reply(200, rayjob("job-h", mode="HTTPMode")),
                            ("GET", pods): _Reply(200, {"items": []})})
    k8s = get_target("k8s")
    with pytest.raises(SubmissionError, match=r"no submitter pod yet \(RUNNING\); .* logs -n team job/job-a"):
        k8s.attach("job-a", namespace="team", api_client=api_client(server)).logs()
    with pytest.raises(SubmissionError, match="runs in HTTPMode: .* logs -n team -l ray.io/node-type=head"):
        k8s.attach("job-h", namespace="team", api_client=api_client(server)).logs()


# ---------------------------------------------------------------------------------------------
# The CLI verbs on k8s


@pytest.mark.parametrize("argv", [["stop", "job-a"], ["logs", "job-a"], ["list"], ["status", "job-a"]])
def test_k8s_verbs_without_a_kubeconfig_say_so_in_one_line(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--target", "k8s"]) == 1
    # status looks for the run folder first (none here), then asks the cluster
    first = "no run job-a under ./runs (a run id, run folder or submission id), and " if argv[0] == "status" else ""
    assert capsys.readouterr().err == (f"ftlaunch: error: {first}no kubeconfig found; pass --kubeconfig or set "
                                       "KUBECONFIG\n")


def test_k8s_verbs_go_through_the_kubernetes_api(monkeypatch, capsys, tmp_path):
    from launcher.k8s import submit as kube

    pods = "https://k8s.invalid/api/v1/namespaces/team/pods"
    server = FakeApiServer({
        ("GET", f"{RAYJOBS}/job-a"): [_Reply(200, rayjob()), _Reply(200, rayjob()), _Reply(200, rayjob()),
                                      _Reply(200, rayjob()), _Reply(200, rayjob())],
        ("DELETE", f"{RAYJOBS}/job-a"): _Reply(200, {}),
        ("GET", RAYJOBS): _Reply(200, {"items": [rayjob()]}),
        ("GET", pods): _Reply(200, {"items": [{"metadata": {"name": "job-a-p"}}]}),
        ("GET", f"{pods}/job-a-p/log"): _Reply(200, "hello from the submitter\n", "text/plain"),
    })
    given = []
    monkeypatch.setattr(kube, "api_client_from", lambda path=None: given.append(path) or api_client(server))
    k8s = ["--target", "k8s", "--namespace", "team", "--kubeconfig", "/k/config"]
    assert main(["status", "job-a", *k8s]) == 0
    assert main(["logs", "job-a", *k8s]) == 0
    # an empty --storage: the checkout's own runs/ (make demo's) are no part of this listing
    assert main(["list", "--storage", str(tmp_path), *k8s]) == 0
    assert main(["stop", "job-a", *k8s]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "job-a  RUNNING  (deployment Running)  m"
    assert out[1] == "hello from the submitter"
    assert out[2].split() == ["RUN", "STATUS", "STEP", "LOSS", "EVAL", "ETA", "STARTED", "DURATION", "KIND", "NAME"]
    # the RayJob's run folder is on the cluster's volume, not here: the row is the RayJob's
    assert out[3].split() == ["job-a", "RUNNING", *["-"] * 6, "finetune", "spec-job-a"]
    assert out[4] == "job-a: stop requested"
    assert ("DELETE", "job-a") in server.methods() and set(given) == {"/k/config"}


def test_the_address_given_wins_over_ray_address_in_its_thread_and_the_environment_is_never_changed(monkeypatch):
    """Twenty threads make clients at once while twenty others copy the environment: Ray's own
    address lookup (what JobSubmissionClient calls) returns each maker's address as given, the
    copies never fail, and outside `_as_given` RAY_ADDRESS still overrides, as Ray documents.
    (Hiding RAY_ADDRESS by popping it failed an environment copy with KeyError under load.)"""
    import os
    import sys
    import threading

    from ray.dashboard.modules.job import sdk

    from launcher.targets.ray import _as_given

    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:9")
    errors, seen = [], set()

    def make(i):
        try:
            for _ in range(200):
                with _as_given():
                    seen.add(sdk.get_address_for_submission_client(f"http://127.0.0.1:{8000 + i}") ==
                             f"http://127.0.0.1:{8000 + i}")
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    def copy():
        try:
            for _ in range(200):
                assert dict(os.environ)["RAY_ADDRESS"] == "http://127.0.0.1:9"
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=make, args=(i,)) for i in range(20)]
    threads += [threading.Thread(target=copy) for _ in range(20)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: races show
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == [] and seen == {True}
    assert sdk.get_address_for_submission_client("http://127.0.0.1:7") == "http://127.0.0.1:9"


def test_a_verb_that_starts_the_embedded_head_says_so_and_how_to_stop_it(monkeypatch, capsys):
    """Starting a real second head here is what item 11's test does (and costs ~20 s): the start
    itself is replaced by a recorded Head; what is tested is that resolve_address says so."""
    from cluster import local
    from launcher.targets.ray import resolve_address

    head = local.Head(pid=4242, address="http://127.0.0.1:8265", gcs_address="127.0.0.1:6379",
                      temp_dir="/tmp/x", num_cpus=2, log="/tmp/x/head.log")
    monkeypatch.setattr(local, "status", lambda: None)
    monkeypatch.setattr(local, "up", lambda: head)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_address(None, embedded=True) == head.address
    err = capsys.readouterr().err
    assert "started the embedded Ray head at http://127.0.0.1:8265 (pid 4242)" in err
    assert "stop it with: ftlaunch cluster down" in err
    monkeypatch.setattr(local, "status", lambda: head)  # already running: nothing to say
    assert resolve_address(None, embedded=True) == head.address
    assert capsys.readouterr().err == ""
