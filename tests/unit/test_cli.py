"""The CLI passes exactly these arguments to Ray's JobSubmissionClient (a recorder stands in)."""

import json

import pytest

import launcher.targets.ray as submit_mod
from launcher.cli.main import main
from launcher.jobplan import PLAN_ENV
from launcher.targets.ray import spec_digest


class Recorder:
    def __init__(self, existing=()):
        self.calls = []
        self.existing = set(existing)

    def get_job_info(self, sid):
        self.calls.append(("get_job_info", sid))
        if sid not in self.existing:
            raise RuntimeError(f"Job {sid} does not exist")
        return type("Info", (), {"metadata": {"ftlaunch_run_dir": "/r"}})()

    def submit_job(self, **kwargs):
        self.calls.append(("submit_job", kwargs))
        self.existing.add(kwargs["submission_id"])
        return kwargs["submission_id"]


@pytest.fixture
def recorder(monkeypatch):
    rec = Recorder(existing={"already-there"})
    monkeypatch.setattr(submit_mod, "client", lambda address: rec)
    return rec


def spec_file(tmp_path):
    from launcher.synthetic import make

    make("counting", 600, tmp_path, split="t")
    path = tmp_path / "s.yaml"
    path.write_text(
        "kind: finetune\nname: cli\nstrategy: {type: lora, r: 4}\n"
        f"data: {{train: {tmp_path}/t.parquet}}\nstorage: {tmp_path}/runs\n"
    )
    return path


def test_submit_passes_exact_arguments(recorder, tmp_path, capsys):
    rc = main(["submit", str(spec_file(tmp_path)), "--no-wait", "--address", "http://10.0.0.9:8265",
               "--submission-id", "cli-1", "train.max_steps=9"])
    assert rc == 0
    (name, kwargs), = [c for c in recorder.calls if c[0] == "submit_job"]
    assert kwargs["entrypoint"] == f"python -m jobs.run --plan-env {PLAN_ENV}"
    assert kwargs["submission_id"] == "cli-1"
    assert kwargs["entrypoint_num_cpus"] == 0
    assert kwargs["metadata"] == {
        "ftlaunch_run_id": "cli-1", "ftlaunch_kind": "finetune", "ftlaunch_name": "cli",
        "ftlaunch_run_dir": f"{tmp_path}/runs/cli-1",
        "ftlaunch_spec_sha256": spec_digest(json.loads(kwargs["runtime_env"]["env_vars"][PLAN_ENV])["spec"]),
    }
    carried = json.loads(kwargs["runtime_env"]["env_vars"][PLAN_ENV])
    assert carried["spec"]["train"]["max_steps"] == 9 and carried["target"] == "ray"
    out = capsys.readouterr().out
    assert "submitted cli-1 to http://10.0.0.9:8265" in out
    assert "ftlaunch status cli-1 --address http://10.0.0.9:8265" in out


def test_resubmitting_an_existing_id_returns_that_job(recorder, tmp_path, capsys):
    rc = main(["submit", str(spec_file(tmp_path)), "--no-wait", "--address", "h:8265",
               "--submission-id", "already-there"])
    assert rc == 0
    assert not [c for c in recorder.calls if c[0] == "submit_job"]
    assert "already submitted already-there" in capsys.readouterr().out


def test_config_errors_print_one_line_and_exit_nonzero(tmp_path, capsys):
    spec = spec_file(tmp_path)
    rc = main(["validate", str(spec), "train.lrr=1", "strategy.r=0"])
    err = capsys.readouterr().err
    assert rc == 1
    assert err == (f"ftlaunch: error: {spec}: 2 problems: strategy.r: Input should be greater than 0 "
                   "(got 0) | train.lrr: unknown key; did you mean 'train.lr'?\n")


def test_ray_target_without_address_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    rc = main(["submit", str(spec_file(tmp_path)), "--target", "ray", "--no-wait"])
    assert rc == 1
    assert "no cluster address; pass --address" in capsys.readouterr().err


def test_submit_to_k8s_without_kubeconfig_writes_a_valid_rayjob(tmp_path, capsys, monkeypatch):
    import yaml

    from launcher.k8s.validate import validate_manifest

    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.kube/config
    monkeypatch.chdir(tmp_path)
    spec = spec_file(tmp_path)
    # Data and runs on the cluster's volume (relative paths resolve there); an image with ftlaunch.
    rc = main(["submit", str(spec), "--target", "k8s", "--profile", "a100-80g-1", "--image", "reg.example/ftl:1",
               "--submission-id", "k8s-run-1", "train.max_steps=5", "resources.gpus_per_worker=1",
               "resources.cpus_per_worker=4", "resources.workers=1", "data.train=data/t.parquet", "storage=runs"])
    out = capsys.readouterr().out
    assert rc == 0, out
    line = next(x for x in out.splitlines() if x.startswith("ftlaunch: next: kubectl apply -f "))
    path = line.removeprefix("ftlaunch: next: kubectl apply -f ")
    manifest = yaml.safe_load(open(path))
    assert manifest["kind"] == "RayJob" and manifest["spec"]["entrypoint"].startswith("python -m jobs.run")
    assert validate_manifest(manifest) == []
    gpu = manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] in (1, "1")
