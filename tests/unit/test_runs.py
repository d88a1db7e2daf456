"""Run-centric state with no cluster: a run's row from its manifest and metrics, the rules that
reconcile a RUNNING manifest with the cluster's word, `status` and `list` with no head running,
finding a run by id, folder or submission id, and what a resume may override."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from common.runfolder import find_run
from launcher.cli.main import main
from launcher.errors import ConfigError, SubmissionError
from launcher.jobplan import resumed_spec
from launcher.runs import GONE, UNKNOWN, list_lines, reconcile, record_stop, run_row, status_lines
from tests.conftest import ROOT, ftlaunch_cli

SPEC = {"kind": "finetune", "name": "demo", "model": {"source": "tiny-llama", "seq_len": 40},
        "strategy": {"type": "lora", "r": 8, "alpha": 16}, "data": {"train": "/data/train.parquet"},
        "train": {"max_steps": 100, "micro_batch": 16, "report_every": 10}}


def make_run(storage: Path, run_id: str, status: str, attempts=("job-1",), steps=(), started=1000.0, **fields):
    """A run folder as jobs/run.py and jobs/loop.py leave it: manifest.json and metrics.jsonl."""
    folder = storage / run_id
    folder.mkdir(parents=True)
    manifest = {"run_id": run_id, "kind": "finetune", "name": "demo", "status": status, "started": started,
                "spec": SPEC, "plan": {}, "attempts": [{"submission_id": a, "started": started} for a in attempts],
                **fields}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    records = [{"step": s, "loss": 5.0 - s / 100, "eval_loss": 5.5 - s / 100, "elapsed_s": s / 2.0}
               for s in steps]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder, manifest


def test_a_running_run_row_has_step_total_loss_eval_eta_start_and_duration(tmp_path):
    folder, manifest = make_run(tmp_path, "demo-1", "RUNNING", steps=(10, 20, 30))
    row = run_row(folder, manifest, now=1060.0)
    assert (row["step"], row["total_steps"], row["loss"], row["eval"]) == (30, 100, 4.7, ("loss", 5.2))
    assert row["eta_s"] == pytest.approx(70 * 15.0 / 30)  # 70 steps to go at 0.5 s a step
    assert (row["started"], row["duration_s"], row["submission_id"]) == (1000.0, 60.0, "job-1")
    lines = status_lines(row)
    assert lines[0] == "demo-1  RUNNING  step 30/100  loss 4.7000  eval loss 5.2000  eta 35s"
    assert lines[1].endswith("duration 1m00s  attempts 1 (latest job job-1)")
    assert lines[-1] == f"artifacts: {folder}"


def test_a_finished_run_has_no_eta_and_its_duration_ends_when_it_finished(tmp_path):
    folder, manifest = make_run(tmp_path, "demo-1", "SUCCEEDED", steps=(100,), finished=1100.0)
    row = run_row(folder, manifest, now=9999.0)
    assert row["eta_s"] is None and row["duration_s"] == 100.0 and row["step"] == 100


@pytest.mark.parametrize("job, status, reason", [
    ("FAILED", "FAILED", "Killed: job job-1 ended FAILED without the driver recording why: exit 137; "
                         "continue it with: ftlaunch resume {folder}"),
    ("STOPPED", "STOPPED", "Stopped: the cluster reports job job-1 STOPPED"),
    (UNKNOWN, "LOST", "Lost: job job-1 is unknown to the cluster at its address (its head was stopped or "
                      "restarted), seen {seen}; continue it with: ftlaunch resume {folder}"),
    (GONE, "LOST", "Lost: the Ray head at its address that ran job job-1 is gone (nothing listens there), "
                   "seen {seen}; continue it with: ftlaunch resume {folder}"),
])
def test_a_running_manifest_whose_job_ended_is_marked_so_with_the_reason(tmp_path, job, status, reason):
    folder, manifest = make_run(tmp_path, "demo-1", "RUNNING")
    out = reconcile(folder, manifest, job, "Job failed\nexit 137")
    on_disk = json.loads((folder / "manifest.json").read_text())
    assert on_disk["status"] == out["status"] == status
    seen = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(on_disk["finished"]))
    assert on_disk["error"] == reason.format(folder=folder, seen=seen)
    assert on_disk["attempts"][-1]["status"] == status and on_disk["finished"]


@pytest.mark.parametrize("manifest_status, job", [("RUNNING", "RUNNING"), ("RUNNING", "PENDING"),
                                                  ("SUCCEEDED", UNKNOWN), ("STOPPED", "FAILED")])
def test_a_live_job_or_a_manifest_that_recorded_its_end_is_left_alone(tmp_path, manifest_status, job):
    folder, manifest = make_run(tmp_path, "demo-1", manifest_status)
    before = (folder / "manifest.json").read_text()
    assert reconcile(folder, manifest, job) == manifest
    assert (folder / "manifest.json").read_text() == before


def test_a_resumed_runs_status_is_its_latest_attempts(tmp_path):
    # attempt 1 was stopped, attempt 2 (the resume) succeeded: the run SUCCEEDED
    folder, manifest = make_run(tmp_path, "demo-1", "SUCCEEDED", attempts=("job-1", "job-1-resume1"),
                                steps=(10, 100), finished=1200.0)
    row = run_row(folder, manifest)
    assert row["status"] == "SUCCEEDED" and row["submission_id"] == "job-1-resume1" and row["attempts"] == 2


def test_find_run_by_folder_id_or_submission_id_and_no_doubled_path(tmp_path, monkeypatch):
    folder, _ = make_run(tmp_path / "runs", "demo-1", "STOPPED", attempts=("job-1", "job-1-resume1"))
    for ref in (str(folder), "demo-1", "job-1", "job-1-resume1"):
        assert find_run(ref, tmp_path / "runs")[0] == folder
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SubmissionError, match=r"^no run at runs/does-not-exist \(no manifest.json\)"):
        find_run("runs/does-not-exist")  # a path is a path, not a run id under ./runs


def test_status_and_list_read_the_run_folders_with_no_head(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FTLAUNCH_HOME", str(tmp_path / "home"))  # no embedded head here
    runs = tmp_path / "runs"
    make_run(runs, "old-1", "RUNNING", steps=(10,), started=1000.0)  # a run of an earlier head
    make_run(runs, "new-2", "SUCCEEDED", steps=(100,), started=2000.0, finished=2100.0)
    assert main(["status", "old-1", "--storage", str(runs)]) == 0
    assert capsys.readouterr().out.startswith("old-1  RUNNING  step 10/100  loss 4.9000  eval loss 5.4000")
    assert main(["status", "job-1", "--storage", str(runs), "--json"]) == 0  # by submission id
    assert json.loads(capsys.readouterr().out)["run_id"] == "old-1"
    assert main(["list", "--storage", str(runs)]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].split()[:8] == ["RUN", "STATUS", "STEP", "LOSS", "EVAL", "ETA", "STARTED", "DURATION"]
    assert [line.split()[:3] for line in lines[1:]] == [["old-1", "RUNNING", "10/100"],
                                                         ["new-2", "SUCCEEDED", "100/100"]]
    assert "no embedded Ray head is running" in err and "as last recorded" in err
    assert main(["list", "--storage", str(runs), "--json"]) == 0
    assert [r["run_id"] for r in json.loads(capsys.readouterr().out)] == ["old-1", "new-2"]


def test_list_lines_have_a_column_per_field():
    row = {"run_id": "r", "status": "RUNNING", "step": 5, "total_steps": 10, "loss": 1.0, "eval": ("loss", 2.0),
           "eta_s": 3700, "started": None, "duration_s": 65, "kind": "finetune", "name": "n"}
    assert list_lines([row])[1].split() == ["r", "RUNNING", "5/10", "1.0000", "2.0000", "1h01m", "-", "1m05s",
                                            "finetune", "n"]


def test_resume_takes_the_overrides_a_resume_may_change_and_refuses_the_rest():
    spec = resumed_spec(SPEC, ("train.max_steps=200", "train.lr=0.001"))
    assert spec["train"]["max_steps"] == 200 and spec["train"]["lr"] == 0.001
    assert SPEC["train"]["max_steps"] == 100  # the recorded spec is not touched
    with pytest.raises(ConfigError, match=r"resume cannot change model.source, train.micro_batch: the run's "
                                          r"checkpoints are of its model, strategy, data and batch"):
        resumed_spec(SPEC, ("model.source=minilm", "train.micro_batch=4", "train.max_steps=5"))
    with pytest.raises(ConfigError, match="train.max_steps"):  # a resumable key still validates
        resumed_spec(SPEC, ("train.max_steps=-1",))


def test_resume_refuses_a_bad_override_in_one_line_before_anything_runs(tmp_path, capsys):
    folder, _ = make_run(tmp_path / "runs", "demo-1", "STOPPED")
    assert main(["resume", str(folder), "strategy.r=4"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("ftlaunch: error: resume cannot change strategy.r: ") and "\n" not in err


def test_a_reader_that_goes_away_is_no_traceback(tmp_path):
    runs = tmp_path / "runs"
    for i in range(3):
        make_run(runs, f"run-{i}", "SUCCEEDED", started=1000.0 + i, finished=1100.0 + i)
    proc = subprocess.Popen([*ftlaunch_cli(), "list", "--storage", str(runs)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "FTLAUNCH_HOME": str(tmp_path / "home")})
    proc.stdout.close()  # `| head -0`: the reader is gone before the first line is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141  # 128 + SIGPIPE, as a shell reports a writer cut off
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_the_client_records_a_stop_it_asked_for_only_on_that_jobs_run(tmp_path):
    folder, _ = make_run(tmp_path, "demo-1", "RUNNING", attempts=("job-1", "job-1-resume1"))
    record_stop(str(folder), "job-1")  # an earlier attempt's id: not what runs now
    assert json.loads((folder / "manifest.json").read_text())["status"] == "RUNNING"
    record_stop(str(folder), "job-1-resume1")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "STOPPED" and manifest["error"] == "Stopped: ftlaunch stop job-1-resume1"
    assert manifest["attempts"][-1]["status"] == "STOPPED"
    record_stop(str(tmp_path / "on-the-cluster"), "job-1")  # a folder this machine cannot see: nothing
    assert not (tmp_path / "on-the-cluster").exists()


def test_a_running_run_whose_loopback_head_is_gone_is_lost_when_read(tmp_path):
    # The attempt's head answered on a loopback port where nothing listens now (the head was
    # SIGKILLed, the machine restarted): no cluster is left to ask, and that is the verdict.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free once closed
    folder, manifest = make_run(tmp_path, "demo-1", "RUNNING", steps=(10,))
    manifest["attempts"][-1]["address"] = f"http://127.0.0.1:{port}"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    from launcher.client import run_status

    row = run_status(str(folder), "ray", storage=str(tmp_path))
    assert row["status"] == "LOST"
    assert row["error"].startswith(f"Lost: the Ray head at http://127.0.0.1:{port} that ran job job-1 is gone")
    assert json.loads((folder / "manifest.json").read_text())["status"] == "LOST"
    # A remote head that does not answer may be the network's fault: no verdict (no connection tried).
    from launcher.client import _refused_on_loopback

    assert not _refused_on_loopback("http://192.0.2.1:8265")


@pytest.mark.parametrize("status, error, marked", [
    ("RUNNING", None, True),
    ("STOPPED", "Stopped: stopped by request (SIGTERM)", True),  # the driver took the head's SIGTERM for a stop
    ("STOPPED", "Stopped: ftlaunch stop job-1", False),  # a stop someone asked for stays one
    ("FAILED", "ValueError: x", False),
])
def test_cluster_down_marks_lost_the_runs_it_was_running_and_no_other(tmp_path, status, error, marked):
    from launcher.runs import mark_lost

    folder, _ = make_run(tmp_path, "demo-1", status, error=error)
    out = mark_lost(folder, "job-1", "its Ray head http://127.0.0.1:1 was stopped (ftlaunch cluster down)")
    on_disk = json.loads((folder / "manifest.json").read_text())
    assert (out is not None) == marked and (on_disk["status"] == "LOST") == marked
    if marked:
        assert on_disk["error"].startswith("Lost: its Ray head http://127.0.0.1:1 was stopped (ftlaunch cluster "
                                           "down) at ") and on_disk["error"].endswith(f"ftlaunch resume {folder}")
    assert mark_lost(folder, "job-2", "x") is None  # not that run's latest job
