"""Tracking against a real MLflow server (the session's, on loopback) and W&B in offline mode (its
run files read back): what the driver's follower logs from a run folder, and across a resume.

The run folder here is written by the test, record by record, as a job's loops write it; the
whole path (a job on the session head, stopped and resumed) is in test_s3.py's run test.
"""

from __future__ import annotations

import json
import time

import pytest

from jobs.artifacts import RunDir
from jobs.tracking import Tracking
from jobs.wandbfile import history, offline_runs, run_record

pytestmark = pytest.mark.integration


def _record(step: int, loss: float, **fields) -> dict:
    return {**fields, "step": step, "loss": loss, "tokens_per_s": 100.0 + step, "elapsed_s": step, "time": time.time()}


def _append(run_dir: RunDir, name: str, *records: dict) -> None:
    for r in records:
        run_dir.append(name, r)


def _plan(run_id: str) -> dict:
    spec = {"kind": "pipeline", "name": "trk", "train": {"lr": 1e-4, "max_steps": 4},
            "env": {"HF_TOKEN": "env:HF_TOKEN"}, "stages": [{"name": "sft"}, {"name": "dpo"}]}
    return {"run_id": run_id, "kind": "pipeline", "spec": spec}


def test_every_record_is_logged_once_at_its_step_with_child_runs_and_a_resume_continues_the_same_runs(
        mlflow_server, tmp_path):
    run_id = "trk-20261204-000000-abcdef"
    run_dir = RunDir(str(tmp_path / run_id))
    run_dir.update_manifest(run_id=run_id, status="RUNNING")
    config = {"mlflow": {"uri": mlflow_server.uri, "experiment": "trk-follow", "log_artifacts": True},
              "wandb": {"project": "ftl", "entity": None, "mode": "offline", "log_artifacts": True}}
    client = mlflow_server.client()

    # Attempt 1: a pipeline's stage records (one file) and a task's file; the attempt fails.
    first = Tracking(config, _plan(run_id), run_dir, attempt=1)
    first.open()
    _append(run_dir, "metrics.jsonl", _record(1, 2.0, stage="sft"), _record(2, 1.5, stage="sft"))
    _append(run_dir, "metrics-qa.jsonl", _record(1, 3.0, task="qa"))
    assert first.poll() == 3
    assert first.poll() == 0  # nothing logged twice
    _append(run_dir, "metrics.jsonl", _record(3, 1.2, stage="sft"))  # its checkpoint never lands
    first.end("FAILED")
    state = json.loads((run_dir.path / "manifest.json").read_text())["tracking"]
    assert state["mlflow"]["logged"] == {"metrics.jsonl": 3, "metrics-qa.jsonl": 1}
    parent = state["mlflow"]["run_id"]
    assert client.get_run(parent).info.status == "FAILED"

    # Attempt 2, a resume: the manifest's ids continue the same runs. Its loop drops the record
    # past its checkpoint (step 3) and writes it again, then goes on into the next stage.
    second = Tracking(config, _plan(run_id), run_dir, attempt=2)
    second.open()
    assert second.state["mlflow"]["run_id"] == parent
    run_dir.truncate_jsonl("metrics.jsonl", lambda r: r["step"] <= 2)
    second.poll()
    _append(run_dir, "metrics.jsonl", _record(3, 1.1, stage="sft"), _record(1, 0.9, stage="dpo"),
            _record(2, 0.7, stage="dpo"))
    _append(run_dir, "metrics-qa.jsonl", _record(2, 2.5, task="qa"))
    (run_dir.path / "adapter").mkdir()
    (run_dir.path / "adapter" / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    (run_dir.path / "checkpoint_000001").mkdir()
    (run_dir.path / "checkpoint_000001" / "state.pt").write_bytes(b"\0" * 64)
    second.end("SUCCEEDED", {"eval_loss_after": 0.7, "steps": 4})

    # MLflow: one run of this run id, a child per curve; every record at its step; the spec's
    # params (not its env); the summary; the export and not the checkpoint.
    experiment = client.get_experiment_by_name("trk-follow")
    runs = client.search_runs([experiment.experiment_id], f"tags.`ftlaunch.run_id` = '{run_id}'")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.run_id for r in parents] == [parent] and parents[0].info.status == "FINISHED"
    children = {r.data.tags["ftlaunch.curve"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent}
    assert sorted(children) == ["dpo", "qa", "sft"]
    assert all(c.info.status == "FINISHED" for c in children.values())
    for curve, name, field in (("sft", "metrics.jsonl", "stage"), ("dpo", "metrics.jsonl", "stage"),
                               ("qa", "metrics-qa.jsonl", "task")):
        kept = [(r["step"], r["loss"]) for r in run_dir.read_jsonl(name) if r.get(field) == curve]
        history_ = sorted(client.get_metric_history(children[curve].info.run_id, "loss"), key=lambda m: m.timestamp)
        logged = [(m.step, m.value) for m in history_]
        # A step an attempt redid (sft's 3) is in the history twice; its last value is the file's.
        assert sorted(dict(logged).items()) == kept, (curve, logged, kept)
        assert len(logged) == len(kept) + (curve == "sft")
    params = client.get_run(parent).data.params
    assert params["train.lr"] == "0.0001" and params["train.max_steps"] == "4" and "env.HF_TOKEN" not in params
    assert client.get_run(parent).data.metrics["summary.eval_loss_after"] == 0.7
    assert client.get_run(parent).data.tags["ftlaunch.attempts"] == "2"
    artifacts = {f.path for f in client.list_artifacts(parent)}
    assert {"adapter", "summary.json", "metrics.jsonl", "manifest.json"} <= artifacts, artifacts
    assert not any(a.startswith("checkpoint_") for a in artifacts)
    assert [f.path for f in client.list_artifacts(parent, "adapter")] == ["adapter/adapter_model.safetensors"]

    # W&B offline: the run and its children each have one file per attempt, the same id; the
    # history rows are the records at their steps.
    found = offline_runs(run_dir.path)
    state = json.loads((run_dir.path / "manifest.json").read_text())["tracking"]["wandb"]
    assert len(found[state["run_id"]]) == 2 and run_record(found[state["run_id"]][0]).run_group == run_id
    qa = state["children"]["qa"]
    assert len(found[qa]) == 2 and run_record(found[qa][0]).job_type == "qa"
    rows = [(row["_step"], row["loss"]) for f in found[qa] for row in history(f)]
    assert rows == [(r["step"], r["loss"]) for r in run_dir.read_jsonl("metrics-qa.jsonl")]


def test_a_tracker_that_is_away_is_a_warning_and_its_records_are_logged_when_it_answers(
        mlflow_server, tmp_path, capsys):
    run_id = "trk-20261204-000001-abcdef"
    run_dir = RunDir(str(tmp_path / run_id))
    run_dir.update_manifest(run_id=run_id, status="RUNNING")
    config = {"mlflow": {"uri": mlflow_server.uri, "experiment": "trk-away", "log_artifacts": False}}
    tracking = Tracking(config, {**_plan(run_id), "kind": "finetune"}, run_dir, attempt=1)
    tracking.open()
    tracker = tracking.trackers[0]
    real = tracker.client
    _append(run_dir, "metrics.jsonl", _record(10, 2.0), _record(20, 1.0))
    # The server goes away (its client points at a closed port), then comes back.
    from mlflow import MlflowClient

    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    tracker.client = MlflowClient(tracking_uri=f"http://127.0.0.1:{closed}")
    import os

    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    try:
        assert tracking.poll() == 0
    finally:
        os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    assert "[ftlaunch] warning: mlflow: metrics not logged yet" in capsys.readouterr().out
    tracker.client = real
    assert tracking.poll() == 2
    tracking.end("SUCCEEDED", {"steps": 20})
    history_ = real.get_metric_history(tracking.state["mlflow"]["run_id"], "loss")
    assert [(m.step, m.value) for m in history_] == [(10, 2.0), (20, 1.0)]
