"""The spec's `tracking:` block and its checks at plan; the follower's pure parts."""

from __future__ import annotations

import importlib.util
import socket

import pytest
import yaml

from common.runfolder import curve_of
from jobs.trackers import artifact_entries, flatten, numeric, wandb_id
from jobs.tracking import _by_curve, _is_metrics, _records
from launcher.errors import ConfigError, PlanError
from launcher.jobplan import plan
from launcher.spec import load_spec
from tests.conftest import ROOT


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spec(tracking: dict, tmp_path) -> dict:
    spec = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    spec.update(tracking=tracking, storage=str(tmp_path / "runs"))
    return spec


def test_a_password_in_the_mlflow_uri_is_refused_with_where_it_goes_instead(tmp_path):
    with pytest.raises(ConfigError, match="tracking.mlflow.uri: .*MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD"):
        load_spec(_spec({"mlflow": {"uri": "https://me:hunter2@mlflow.example.com"}}, tmp_path))
    with pytest.raises(ConfigError, match="names no scheme"):
        load_spec(_spec({"mlflow": {"uri": "mlflow.example.com:5000"}}, tmp_path))
    with pytest.raises(ConfigError, match="tracking.wandb.mode"):
        load_spec(_spec({"wandb": {"project": "p", "mode": "sometimes"}}, tmp_path))


def test_a_server_that_does_not_answer_is_refused_on_the_embedded_head_and_a_warning_elsewhere(tmp_path):
    uri = f"http://127.0.0.1:{_closed_port()}"
    spec = load_spec(_spec({"mlflow": {"uri": uri}}, tmp_path))
    with pytest.raises(PlanError, match=rf"tracking.mlflow.uri {uri} does not answer \(.*\); start the server"):
        plan(spec, "local", preflight=False)
    warnings = plan(spec, "k8s", preflight=False).warnings
    assert any(w.startswith(f"tracking.mlflow.uri {uri} does not answer") and "not checked on the cluster" in w
               for w in warnings), warnings


def test_a_missing_tracker_package_is_one_line_at_plan(tmp_path, monkeypatch):
    # The packages are installed here: their absence is what find_spec would say without them.
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    spec = load_spec(_spec({"wandb": {"project": "p", "mode": "offline"}}, tmp_path))
    with pytest.raises(PlanError, match=r"tracking.wandb: the wandb package is not installed here; pip install 'ftlaunch\[tracking\]'"):
        plan(spec, "local", preflight=False)


def test_online_wandb_without_a_key_reference_is_warned_and_the_plan_names_the_trackers(tmp_path):
    from launcher.cli.plan import describe

    job = plan(load_spec(_spec({"wandb": {"project": "p", "entity": "team"}}, tmp_path)), "local", preflight=False)
    assert any("WANDB_API_KEY" in w for w in job.warnings), job.warnings
    assert "tracking      wandb team/p (online)" in describe(job)


def test_records_are_their_numbers_at_their_step_and_the_spec_flattens_to_params():
    record = {"stage": "sft", "step": 20, "loss": 1.5, "preempted": True, "tokens": 640, "time": 1.0}
    assert numeric(record) == {"loss": 1.5, "tokens": 640.0}
    assert flatten({"train": {"lr": 1e-4, "sizes": [1, 2]}, "name": "x", "data": {}}) == {
        "train.lr": 1e-4, "train.sizes": [1, 2], "name": "x", "data": {}}


def test_curves_and_what_a_metrics_file_is():
    assert curve_of("metrics.jsonl", {"step": 1}) == ""
    assert curve_of("metrics.jsonl", {"step": 1, "stage": "dpo"}) == "dpo"
    assert curve_of("metrics-qa.jsonl", {"step": 1, "task": "qa"}) == "qa"
    assert curve_of("variants/lora/metrics.jsonl", {"step": 1}) == "lora"
    assert [_is_metrics(r) for r in ("metrics.jsonl", "metrics-qa.jsonl", "variants/a/metrics.jsonl",
                                     "logs/metrics.jsonl", "events.jsonl")] == [True, True, True, False, False]
    stages = [{"step": 1, "stage": "a"}, {"step": 2, "stage": "a"}, {"step": 1, "stage": "b"}, {"event": "x"}]
    assert _by_curve("metrics.jsonl", stages) == [("a", stages[:2]), ("b", stages[2:3])]


def test_a_last_line_still_being_written_is_not_a_record_yet():
    assert _records('{"step": 1}\n{"step": 2}\n{"st') == [{"step": 1}, {"step": 2}]


def test_wandb_ids_are_what_wandb_takes():
    assert wandb_id("run.1", "stage 2") == "run-1-stage-2"
    long = wandb_id("x" * 60, "task")
    assert len(long) == 64 and long != wandb_id("x" * 60, "other")


def test_the_artifacts_are_the_exports_and_records_not_checkpoints_or_tracker_files(tmp_path):
    for name in ("adapter", "checkpoint_000002", "tensorboard", "wandb", ".progress", "report"):
        (tmp_path / name).mkdir()
    (tmp_path / "manifest.json").write_text("{}")
    (tmp_path / "checkpoint_manager_snapshot.json").write_text("{}")
    assert [p.name for p in artifact_entries(tmp_path)] == ["adapter", "manifest.json", "report"]


def test_an_error_line_never_shows_a_uri_s_credentials(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_spec(_spec({"mlflow": {"uri": "https://me:hunter2@mlflow.example.com"}}, tmp_path))
    assert "hunter2" not in str(err.value) and "***@mlflow.example.com" in str(err.value)
