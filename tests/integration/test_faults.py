"""Faults on the session's real Ray head: a killed worker, a killed driver, a job that waits
forever, 20 submissions at once; durable logs; secrets and hostile spec values."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import launcher
from bench.load import Calls
from launcher import capacity
from launcher.client import attach, list_jobs
from tests.integration.test_jobs import cli, write_spec

pytestmark = pytest.mark.integration
CLOSED = "http://127.0.0.1:9"  # nothing listens there: "the cluster is gone"


def steps_of(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x)["step"] for x in path.read_text().splitlines()] if path.exists() else []


def wait_for_step(run_dir: Path, step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if steps_of(run_dir) and steps_of(run_dir)[-1] >= step:
            return
        time.sleep(0.3)
    raise AssertionError(f"no step {step} in {run_dir} after {timeout}s: {steps_of(run_dir)}")


STEPS = 200  # the killed runs' length


def test_a_killed_worker_is_replaced_and_no_step_is_lost_or_repeated(ray_head, tiny_spec):
    from ray.util.state import list_actors

    # Long enough that the kill lands mid-run however fast the steps go (a 60-step run once ended
    # before a stop landed, on CI). max_failures: 1 by default.
    tiny_spec["train"].update(max_steps=STEPS, report_every=5)
    handle = launcher.submit(tiny_spec, "ray", address=ray_head.address, submission_id="ft-kill-worker")
    run_dir = Path(handle.run_dir)
    wait_for_step(run_dir, 10)
    workers = list_actors(address=ray_head.address, detail=True, raise_on_missing_output=False,
                          filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    assert len(workers) == 2, workers
    killed_at = steps_of(run_dir)[-1]
    os.kill(workers[1].pid, signal.SIGKILL)  # a worker of the job this test submitted

    assert handle.wait(timeout=300) == "SUCCEEDED", handle.logs()[-3000:]
    manifest = handle.manifest()
    assert manifest["status"] == "SUCCEEDED" and manifest["summary"]["steps"] == STEPS
    assert steps_of(run_dir) == list(range(5, STEPS + 5, 5))  # every report once: none lost, none twice
    assert killed_at < STEPS
    # The replacement workers wrote their own log beside the first ones'.
    worker_logs = "".join(p.read_text() for p in (run_dir / "logs").glob("worker-*.log"))
    assert worker_logs.count("=== worker-0 pid") == 2, worker_logs[:2000]


def test_a_killed_driver_resumes_from_the_checkpoint_and_its_logs_outlive_the_cluster(ray_head, tiny_spec, tmp_path):
    tiny_spec["train"].update(max_steps=STEPS, report_every=5)
    handle = launcher.submit(tiny_spec, "ray", address=ray_head.address, submission_id="ft-kill-driver")
    run_dir = Path(handle.run_dir)
    wait_for_step(run_dir, 10)
    driver = json.loads((run_dir / "manifest.json").read_text())["attempts"][-1]["driver_pid"]
    os.kill(driver, signal.SIGKILL)  # the job's driver, started for this test's submission
    assert handle.wait(timeout=120) == "FAILED"
    # The driver had no chance to record its end; the client that saw the job end records it.
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "FAILED", manifest["status"]
    assert manifest["error"].startswith("Killed: job ft-kill-driver ended FAILED without the driver recording why")
    status = cli("status", "ft-kill-driver", "--address", ray_head.address)
    assert "FAILED" in status.stdout and f"ftlaunch resume {run_dir}" in status.stdout, status.stdout

    out = cli("resume", str(run_dir), "--address", ray_head.address)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "SUCCEEDED" and manifest["summary"]["steps"] == STEPS
    assert [a["submission_id"] for a in manifest["attempts"]] == ["ft-kill-driver", "ft-kill-driver-resume1"]
    assert steps_of(run_dir) == list(range(5, STEPS + 5, 5))

    # The cluster is gone (nothing answers at the address): the logs come from the run folder.
    logs = cli("logs", "ft-kill-driver", "--storage", tiny_spec["storage"], "--address", CLOSED, "--workers")
    assert logs.returncode == 0, logs.stderr
    assert "cannot reach a Ray cluster" in logs.stderr and str(run_dir / "logs") in logs.stderr
    assert "=== attempt 1 submission ft-kill-driver" in logs.stdout
    assert "=== attempt 2 submission ft-kill-driver-resume1" in logs.stdout
    assert f"[ftlaunch] step {STEPS}/{STEPS}" in logs.stdout  # the driver's progress lines, as they ran
    assert "--- worker-0.log" in logs.stdout and "--- worker-1.log" in logs.stdout


def test_a_resume_whose_last_checkpoint_was_cut_short_continues_from_the_whole_one_before(ray_head, tiny_spec):
    # Ray Train refuses a run folder whose snapshot names a checkpoint that is gone ("corrupted");
    # on CI a stop that landed while a succeeded run pruned its checkpoints left one so. Here the
    # stopped run's latest checkpoint loses a file, as a prune or upload killed mid-way leaves it.
    tiny_spec["train"].update(max_steps=STEPS, report_every=10)
    handle = launcher.submit(tiny_spec, "ray", address=ray_head.address, submission_id="ft-cut-short")
    run_dir = Path(handle.run_dir)
    wait_for_step(run_dir, 20)
    assert handle.stop() and handle.wait(timeout=120) == "STOPPED"
    snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    earlier, latest = snapshot["checkpoint_results"][-2:]  # Ray Train keeps two
    cut = run_dir / latest["checkpoint_dir_name"]
    assert (cut / ".ftl-checkpoint-rank0.json").exists()
    next(f for f in sorted(cut.rglob("*")) if f.is_file() and not f.name.startswith(".")).unlink()

    out = cli("resume", str(run_dir), "--address", ray_head.address)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    driver_log = (run_dir / "logs" / "driver.log").read_text()
    assert f"checkpoint {latest['checkpoint_dir_name']} of ft-cut-short is gone or cut short" in driver_log
    worker_log = "".join(p.read_text() for p in (run_dir / "logs").glob("worker-0*.log"))
    assert f"resumed at step {earlier['metrics']['step']} from the last checkpoint" in worker_log, worker_log[-3000:]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "SUCCEEDED" and manifest["summary"]["steps"] == STEPS
    assert steps_of(run_dir) == list(range(10, STEPS + 10, 10))  # each once: the redone steps replaced


def test_a_job_no_node_can_place_is_refused_at_submit_with_the_clusters_shape(ray_head, tiny_spec, tmp_path):
    # 8 CPUs a worker on a 2-CPU head with no autoscaler: it would wait pending_timeout for nothing.
    tiny_spec["resources"] = {"workers": 1, "cpus_per_worker": 8}
    planned = cli("plan", str(write_spec(tiny_spec, tmp_path)), "--target", "ray", "--address", ray_head.address)
    assert planned.returncode != 0 and "a worker asks {CPU: 8}" in planned.stderr, planned.stderr
    assert len(planned.stderr.strip().splitlines()) == 1
    with pytest.raises(launcher.PlanError) as err:
        launcher.submit(tiny_spec, "ray", address=ray_head.address, submission_id="ft-never")
    line = str(err.value)
    assert "a worker asks {CPU: 8}" in line and "1 x {CPU: 2}" in line and "cpus_per_worker" in line
    assert not any(j["submission_id"] == "ft-never" for j in list_jobs("ray", address=ray_head.address))


def test_a_job_waiting_on_resources_past_pending_timeout_is_stopped_with_the_reason(ray_local, ray_head, tiny_spec):
    # The job fits the head, but an actor holds both its CPUs: Ray keeps it PENDING; the watchdog ends it.
    @ray_local.remote(num_cpus=2)
    class Holder:
        def ready(self):
            return True

    holder = Holder.remote()
    ray_local.get(holder.ready.remote(), timeout=60)
    try:
        tiny_spec["resources"] = {"workers": 1, "cpus_per_worker": 1}
        tiny_spec["pending_timeout"] = 8
        started = time.monotonic()
        handle = launcher.submit(tiny_spec, "ray", address=ray_head.address, submission_id="ft-pending")
        assert handle.wait(timeout=180) == "FAILED"
        assert time.monotonic() - started < 120
    finally:
        ray_local.kill(holder)
    error = handle.manifest()["error"]
    status = cli("status", "ft-pending", "--address", ray_head.address)
    assert f"error: {error}" in status.stdout
    assert error.startswith("PendingTimeout: stopped after waiting"), error
    assert "pending_timeout 8s" in error and "{CPU: 1}" in error and "{CPU: 2} in all" in error


def test_twenty_concurrent_submissions_are_twenty_jobs_and_a_resubmit_is_the_same_job(ray_head, tiny_spec):
    tiny_spec["train"]["max_steps"] = 100000
    tiny_spec["resources"] = {"workers": 1, "cpus_per_worker": 0.5}
    ids = [f"ft-many-{i:02d}" for i in range(20)]

    def submit(sid):
        return launcher.submit(dict(tiny_spec), "ray", address=ray_head.address, submission_id=sid)

    with ThreadPoolExecutor(max_workers=20) as pool:
        futures = [pool.submit(submit, sid) for sid in ids]
    handles = [f.result() for f in futures if f.exception() is None]
    try:
        failed = [f"{sid}: {f.exception()!r}" for sid, f in zip(ids, futures) if f.exception() is not None]
        assert not failed, failed[:3]
        assert [h.submission_id for h in handles] == ids and not any(h.existing for h in handles)
        assert len({h.run_dir for h in handles}) == 20
        tracked = {j["submission_id"]: j for j in list_jobs("ray", ray_head.address)}
        assert set(ids) <= set(tracked)
        assert {tracked[i]["run_dir"] for i in ids} == {h.run_dir for h in handles}
        # The head runs as many drivers at once as it has driver slots (4 on this 2-CPU head); the
        # rest wait PENDING in Ray's job manager, with no process (a driver holds ~400 MB).
        slots = capacity.read_cluster(ray_head.address).driver_slots
        assert slots == 4
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            statuses = [j["status"] for j in list_jobs("ray", ray_head.address) if j["submission_id"] in ids]
            if statuses.count("RUNNING") == slots:
                break
            time.sleep(1.0)
        assert statuses.count("RUNNING") == slots and statuses.count("PENDING") == 20 - slots, statuses
        # 10 clients at once calling status, list and logs on them for 10 s: none fails (the full
        # load, 50 submissions and 60 s, with each call's latency: bench/load.py, make bench).
        calls = Calls()
        calls.hammer(ray_head.address, ids, Path(tiny_spec["storage"]), seconds=10, threads=10)
        assert not calls.errors, calls.errors[:3]
        assert min(len(v) for k, v in calls.latencies.items() if k != "submit") >= 10, calls.latencies
        assert calls.most_running <= slots
        again = submit(ids[7])  # the same id again: that job, not a new one
        assert again.existing and again.run_dir == handles[7].run_dir
        assert sum(1 for j in list_jobs("ray", ray_head.address) if j["submission_id"] == ids[7]) == 1
    finally:  # every job this test made, also one whose submit call raised: none may run on
        for sid in ids:
            try:
                attach(sid, "ray", ray_head.address).stop()
            except Exception:  # noqa: BLE001 -- never submitted, or already ended
                pass
    for h in handles:
        assert h.wait(timeout=180) in ("STOPPED", "SUCCEEDED", "FAILED")
        assert attach(h.submission_id, "ray", ray_head.address).status() == "STOPPED"
    # A driver that started as its stop landed ends itself (jobs/watch.py): none runs on.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        running = [h.submission_id for h in handles if (Path(h.run_dir) / "manifest.json").exists()
                   and json.loads((Path(h.run_dir) / "manifest.json").read_text())["status"] == "RUNNING"]
        if not running:
            break
        time.sleep(1.0)
    assert not running, f"drivers of stopped jobs still running: {running}"


def test_a_driver_whose_job_ray_reports_stopped_ends_itself(ray_head, tiny_spec, tmp_path):
    """Ray can mark a job STOPPED while the driver it was starting runs on: on CI a stop reached
    the supervisor before the driver, and the driver trained 15 minutes unsupervised, holding the
    CPUs the next tests waited for. The driver's guard asks Ray (the real Jobs API of this head)
    for its job's status and ends itself once Ray says the job ended. The guard runs here in the
    test's process: `end` stands for the driver's exit, the only part not real."""
    import threading

    from jobs.artifacts import RunDir
    from jobs.watch import watch_job_status

    tiny_spec["train"].update(max_steps=100000, report_every=5)
    handle = launcher.submit(tiny_spec, "ray", address=ray_head.address, submission_id="ft-outlived")
    wait_for_step(Path(handle.run_dir), 5)
    scratch = RunDir(str(tmp_path / "driver-run"))
    scratch.update_manifest(status="RUNNING", attempts=[{"submission_id": "ft-outlived", "status": "RUNNING"}])
    ended = threading.Event()
    with watch_job_status("ft-outlived", ray_head.address, scratch, poll=0.2, end=ended.set):
        assert not ended.wait(3.0)  # the job runs: the guard leaves its driver alone
        handle.stop()
        assert handle.wait(timeout=60) == "STOPPED"
        assert ended.wait(30.0), "the guard did not end a driver whose job Ray reports STOPPED"
    manifest = scratch.read_manifest()
    assert manifest["status"] == "STOPPED" and manifest["attempts"][-1]["status"] == "STOPPED", manifest
    assert manifest["error"].startswith("Stopped: Ray reports job ft-outlived STOPPED while its driver"), manifest


def test_secrets_come_from_env_references_and_are_written_nowhere(ray_head, tiny_spec, tmp_path):
    secret = os.environ["FTL_TEST_SECRET"]  # in the head's environment since it started
    canary = tmp_path / f"pwned-{uuid.uuid4().hex}"
    hostile = f"$(touch {canary}); `touch {canary}` && touch {canary} | touch {canary}"
    tiny_spec["train"].update(max_steps=10, report_every=5)
    tiny_spec["env"] = {"HF_TOKEN": "env:FTL_TEST_SECRET", "PLAIN_NOTE": hostile}
    tiny_spec["storage"] = str(tmp_path / "runs $(touch x)")  # a folder with a hostile name
    path = write_spec(tiny_spec, tmp_path)
    out = cli("submit", str(path), "--submission-id", "ft-secret", "--address", ray_head.address)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run_dir = Path(tiny_spec["storage"]) / "ft-secret"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "SUCCEEDED" and manifest["env_from_cluster"] == ["HF_TOKEN"]

    # No spec value reached a shell: the entrypoint is fixed text and nothing ran the commands.
    info = attach("ft-secret", "ray", ray_head.address).info()
    assert info.entrypoint == "python -m jobs.run --plan-env FTLAUNCH_PLAN"
    assert not canary.exists() and not (ROOT_CWD / "x").exists()
    assert info.runtime_env["env_vars"]["PLAIN_NOTE"] == hostile  # passed as data, untouched
    assert "HF_TOKEN" not in info.runtime_env["env_vars"]  # the reference is resolved on the cluster

    report = cli("report", str(run_dir))
    assert report.returncode == 0, report.stderr
    logs = cli("logs", "ft-secret", "--address", ray_head.address, "--workers")
    texts = {"submit output": out.stdout + out.stderr, "ray job info": json.dumps(
        {"metadata": info.metadata, "runtime_env": info.runtime_env, "entrypoint": info.entrypoint}),
        "logs": logs.stdout + logs.stderr, "ray job log": attach("ft-secret", "ray", ray_head.address).logs()}
    for where, text in texts.items():
        assert secret not in text, where
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert len(files) > 10 and any(p.suffix == ".png" for p in files)
    leaked = [str(p) for p in files if secret.encode() in p.read_bytes()]
    assert leaked == []


ROOT_CWD = Path(__file__).resolve().parent.parent.parent


def test_a_preempted_worker_checkpoints_at_its_next_step_and_the_retry_redoes_no_step(ray_head, tiny_spec):
    from ray.util.state import list_actors

    every = 20
    tiny_spec["train"].update(max_steps=STEPS, report_every=every)
    handle = launcher.submit(tiny_spec, "ray", address=ray_head.address, submission_id="ft-preempt")
    run_dir = Path(handle.run_dir)
    wait_for_step(run_dir, every)
    workers = list_actors(address=ray_head.address, detail=True, raise_on_missing_output=False,
                          filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    assert len(workers) == 2, workers
    noticed_after = steps_of(run_dir)[-1]
    os.kill(workers[1].pid, signal.SIGTERM)  # a spot reclaim's notice, to a worker of this test's job

    assert handle.wait(timeout=300) == "SUCCEEDED", handle.logs()[-3000:]
    manifest = handle.manifest()
    assert manifest["status"] == "SUCCEEDED" and manifest["summary"]["steps"] == STEPS
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    preempted = [r["step"] for r in records if r.get("preempted")]
    assert len(preempted) == 1, records
    at = preempted[0]
    # The checkpoint came at the step after the notice, before the next scheduled report, and
    # the retry continued from it: that record survived (a retry from the last scheduled
    # checkpoint would have truncated it), and every step was reported once.
    assert noticed_after < at < STEPS and at < (noticed_after // every + 2) * every, (noticed_after, at)
    steps = [r["step"] for r in records]
    assert steps == sorted(set(list(range(every, STEPS + every, every)) + [at])), steps
    worker_logs = "".join(p.read_text() for p in (run_dir / "logs").glob("worker-*.log"))
    assert "SIGTERM" in worker_logs and "checkpointing at the next step" in worker_logs, worker_logs[-2000:]
    assert f"Preempted: a worker was told to stop (SIGTERM); checkpoint at step {at}" in handle.logs()
