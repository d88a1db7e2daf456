"""The plan is pure: no network, deterministic, and it carries everything submit needs."""

import datetime as dt
import json
import socket

import pytest

from launcher.errors import PlanError
from launcher.jobplan import PLAN_ENV, plan
from launcher.spec import load_spec

SPEC = {
    "kind": "finetune", "name": "p", "strategy": {"type": "lora"},
    "data": {"train": "data/t.parquet", "retain": "s3://bucket/retain.parquet"},
    "resources": {"workers": 3, "cpus_per_worker": 0.5}, "storage": "runs",
    "train": {"max_steps": 10},
}
NOW = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("plan() touched the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_plan_resolves_paths_resources_and_ids():
    job = plan(load_spec(SPEC), "local", base_dir="/home/u/proj", now=NOW, preflight=False)
    assert job.run_id == job.submission_id
    assert job.run_id.startswith("p-20260102-030405-")
    assert job.spec["data"]["train"] == "/home/u/proj/data/t.parquet"
    assert job.spec["data"]["retain"] == "s3://bucket/retain.parquet"  # URIs untouched
    assert job.storage_path == "/home/u/proj/runs"
    assert job.run_dir == f"/home/u/proj/runs/{job.run_id}"
    assert job.resources == {"workers": 3, "cpus_per_worker": 0.5, "gpus_per_worker": 0.0,
                             "total_cpus": 1.5, "total_gpus": 0.0, "data_tasks": 3}
    assert job.entrypoint_num_cpus == 0


def test_plan_is_deterministic_and_travels_in_the_runtime_env():
    a = plan(load_spec(SPEC), base_dir="/x", now=NOW, preflight=False)
    b = plan(load_spec(SPEC), base_dir="/x", now=NOW, preflight=False)
    assert a == b
    carried = json.loads(a.runtime_env["env_vars"][PLAN_ENV])
    assert carried["run_id"] == a.run_id and carried["spec"] == a.spec
    # No spec field reaches the shell: the entrypoint is fixed text.
    assert a.entrypoint == f"python -m jobs.run --plan-env {PLAN_ENV}"
    assert [p.rsplit("/", 1)[1] for p in a.runtime_env["py_modules"]] == ["common", "launcher", "jobs", "cluster"]


def test_explicit_submission_id_and_bad_one():
    job = plan(load_spec(SPEC), submission_id="my-run-1", base_dir="/x", preflight=False)
    assert job.submission_id == job.run_id == "my-run-1"
    with pytest.raises(PlanError, match="submission id 'a b;rm' is invalid"):
        plan(load_spec(SPEC), submission_id="a b;rm", preflight=False)


def test_remote_target_warns_about_local_storage():
    job = plan(load_spec(SPEC), "ray", base_dir="/x", preflight=False)
    assert any("shared filesystem" in w for w in job.warnings)
    with pytest.raises(PlanError, match="target 'moon' is unknown"):
        plan(load_spec(SPEC), "moon", preflight=False)


def make_data(tmp_path, rows=600):
    from launcher.synthetic import make

    return str(make("counting", rows, tmp_path))


def test_preflight_counts_rows_and_derives_steps_from_epochs(tmp_path):
    spec = {**SPEC, "data": {"train": make_data(tmp_path)}, "train": {"epochs": 2, "micro_batch": 10}}
    job = plan(load_spec(spec), base_dir=str(tmp_path))
    assert job.data == {"train": {"rows": 600, "files": 1}}
    assert job.spec["train"]["max_steps"] == 2 * 20  # 600 rows / (10 x 3 workers) per epoch
    est = job.estimate
    assert est["parameters"]["trainable"] == est["parameters"]["lora_closed_form"] > 0
    assert est["fit"]["verdict"] == "fits"


def test_preflight_refuses_missing_or_broken_data_before_submit(tmp_path):
    from launcher.errors import ConfigError

    with pytest.raises(ConfigError, match="does not exist"):
        plan(load_spec({**SPEC, "data": {"train": str(tmp_path / "none.parquet")}}))
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ConfigError, match="broken.parquet"):
        plan(load_spec({**SPEC, "data": {"train": str(broken)}}))
    wrong = {**SPEC, "data": {"train": make_data(tmp_path), "columns": {"text": "body"}}}
    with pytest.raises(ConfigError, match="no column 'body'"):
        plan(load_spec(wrong))


def test_unschedulable_job_is_refused_at_plan(tmp_path, monkeypatch):
    monkeypatch.setenv("FTLAUNCH_LOCAL_GPUS", "0")  # this machine's GPUs, if any, out of it
    spec = {**SPEC, "data": {"train": make_data(tmp_path)},
            "resources": {"workers": 2, "cpus_per_worker": 1, "gpus_per_worker": 2}}
    with pytest.raises(PlanError, match="cannot-schedule on profile a100-80g-1"):
        plan(load_spec(spec), "ray", profile="a100-80g-1")
    with pytest.raises(PlanError, match="cannot-schedule on profile local-cpu"):
        plan(load_spec(spec), "local")
