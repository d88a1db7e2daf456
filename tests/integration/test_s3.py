"""Data in object storage, against a real S3 API server on loopback (moto's, started by the test
session; tests/s3server.py): the pre-flight reads footers and first lines through pyarrow's S3
filesystem, a missing object or bucket is one line at plan; a job on the session's head streams
its splits from a bucket and writes its run folder to one (common/runstore.py), and the client's
verbs (status, resume, report, infer) read it there."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

import launcher
from launcher.datacheck import check_dataset
from launcher.errors import ConfigError

pytestmark = pytest.mark.integration


def test_plan_reads_s3_data_where_it_is_and_names_a_missing_object_or_bucket(s3_server, s3_data, demo_data):
    for role in ("train", "eval", "retain"):
        assert check_dataset(s3_data[role], "causal_lm").rows == check_dataset(demo_data[role], "causal_lm").rows
    assert check_dataset(s3_data["train_jsonl"], "causal_lm").rows == check_dataset(demo_data["train"], "causal_lm").rows
    # A folder prefix lists its objects, as a local folder does.
    assert check_dataset(s3_server.uri("ftl-data", "demo"), "causal_lm", role="eval").files == 3

    with pytest.raises(ConfigError) as missing:
        check_dataset(s3_server.uri("ftl-data", "demo/nope.parquet"), "causal_lm")
    assert str(missing.value).startswith("data.train: s3://ftl-data/demo/nope.parquet does not exist; fix the path")
    with pytest.raises(ConfigError) as no_bucket:
        check_dataset(s3_server.uri("no-such-bucket", "train.parquet"), "causal_lm", role="eval")
    assert str(no_bucket.value) == ("data.eval: the bucket no-such-bucket of s3://no-such-bucket/train.parquet "
                                    "does not exist; create it or fix the URI")
    assert "endpoint_override" not in str(no_bucket.value)  # the line names the object, not the options


def test_plan_names_a_storage_bucket_that_is_not_there_and_keeps_the_uri_options_in_the_run_dir(s3_server, tiny_spec):
    from launcher.spec import validate

    tiny_spec["storage"] = s3_server.uri("no-runs-bucket", "runs")
    with pytest.raises(launcher.PlanError) as missing:
        launcher.plan(validate(tiny_spec), "ray", preflight=False)
    assert str(missing.value) == ("storage s3://no-runs-bucket/runs: the bucket no-runs-bucket does not exist; "
                                  "create it or fix the URI")
    tiny_spec["storage"] = s3_server.uri(s3_server.bucket("ftl-plan"), "runs")
    plan = launcher.plan(validate(tiny_spec), "ray", submission_id="p1", preflight=False)
    assert plan.run_dir == s3_server.uri("ftl-plan", "runs/p1")  # the endpoint stays with the run's URI


def test_a_mirror_pushes_what_changed_removes_what_it_removed_and_a_pull_sees_same_size_changes(
        s3_server, tmp_path):
    from common.runstore import Mirror

    uri = s3_server.uri(s3_server.bucket("ftl-mirror"), "runs/r1")
    here = Mirror(uri, tmp_path / "mirror")
    (here.local / "logs").mkdir()
    (here.local / "manifest.json").write_text('{"status": "RUNNING"}')
    (here.local / "logs" / "driver.log").write_text("line 1\n")
    (here.local / ".base-pending").mkdir()
    (here.local / ".base-pending" / "config.json").write_text("{}")
    (here.local / "checkpoint_000000").mkdir()  # Ray Train's own, never mirrored
    (here.local / "checkpoint_000000" / "state.pt").write_text("x")
    assert here.push() == 3 and here.push() == 0  # nothing changed: nothing sent again
    (here.local / ".base-pending").rename(here.local / "base")  # a temporary renamed into place
    assert here.push() == 1
    assert sorted(_remote_files(s3_server, "ftl-mirror", "runs/r1")) == [
        "base/config.json", "logs/driver.log", "manifest.json"]

    there = Mirror(uri, tmp_path / "cache")
    assert there.pull() == 3 and there.pull() == 0
    (here.local / "manifest.json").write_text('{"status": "STOPPED"}')  # the same size, new content
    time.sleep(1.1)  # S3 keeps a second's resolution
    here.push()
    assert there.pull(only=("manifest.json",)) == 1
    assert json.loads((there.local / "manifest.json").read_text()) == {"status": "STOPPED"}


def test_a_folder_of_a_run_in_s3_is_each_nodes_own_and_what_another_node_wrote_is_pulled_where_it_is_read(
        s3_server, tmp_path, monkeypatch):
    # Two nodes in one process: each is its own FTLAUNCH_SCRATCH (its local disk); the store is
    # the real S3 server. What a pipeline's stages and a multitask's driver do on several nodes.
    from common import runstore
    from jobs import artifacts
    from jobs.artifacts import RunDir, on_this_node

    uri = s3_server.uri(s3_server.bucket("ftl-nodes"), "runs/pipe-1")
    monkeypatch.setenv("FTLAUNCH_SCRATCH", str(tmp_path / "node-a"))
    driver = RunDir(uri)
    driver.fresh_mirror()
    pusher = driver.start_sync(every_s=60)
    (driver.path / "stages" / "sft" / "model").mkdir(parents=True)
    (driver.path / "stages" / "sft" / "model" / "config.json").write_text('{"from": "node a"}')
    pusher.stop()  # its last push: stage sft's export is in the store
    a_path = driver.path

    # Node B: a worker given the driver's paths keeps its own copies on its disk.
    monkeypatch.setenv("FTLAUNCH_SCRATCH", str(tmp_path / "node-b"))
    monkeypatch.setenv(runstore.RUN_URI_ENV, uri)
    monkeypatch.setattr(artifacts, "_MIRRORS", {})
    source = Path(on_this_node(str(a_path / "stages" / "sft" / "model")))
    assert source == tmp_path / "node-b" / a_path.relative_to(tmp_path / "node-a") / "stages" / "sft" / "model"
    assert json.loads((source / "config.json").read_text()) == {"from": "node a"}  # pulled from the store
    stage = RunDir(str(a_path / "stages" / "dpo"))  # the next stage's folder, trained on node B
    assert stage.path.is_relative_to(tmp_path / "node-b") and stage.remote == runstore.join(uri, "stages/dpo")
    stage.append("metrics.jsonl", {"step": 10, "loss": 1.0})
    stage.sync()
    remote = _remote_files(s3_server, "ftl-nodes", "runs/pipe-1")
    assert "stages/dpo/metrics.jsonl" in remote and not any(runstore.REMOTE_MARK in k for k in remote), remote

    # Node A again: the driver reads what node B wrote; its own newer files are not overwritten.
    monkeypatch.setenv("FTLAUNCH_SCRATCH", str(tmp_path / "node-a"))
    monkeypatch.setattr(artifacts, "_MIRRORS", {})
    (a_path / "stages" / "dpo").mkdir(parents=True, exist_ok=True)
    (a_path / "stages" / "dpo" / "events.jsonl").write_text("mine\n")
    s3_server.filesystem().open_output_stream("ftl-nodes/runs/pipe-1/stages/dpo/events.jsonl").close()
    assert Path(on_this_node(str(a_path / "stages" / "dpo"))) == a_path / "stages" / "dpo"
    assert (a_path / "stages" / "dpo" / "metrics.jsonl").read_text() == '{"step": 10, "loss": 1.0}\n'
    assert (a_path / "stages" / "dpo" / "events.jsonl").read_text() == "mine\n"


def test_render_k8s_with_s3_storage_mounts_no_volume_and_gives_every_pod_its_credentials_by_secret(
        s3_server, s3_data, tmp_path, capsys):
    import yaml

    from launcher.cli.main import main
    from launcher.k8s.validate import mount_problems, security_problems, validate_manifest

    storage = s3_server.uri(s3_server.bucket("ftl-k8s"), "runs")
    common = [str(Path(__file__).resolve().parents[2] / "configs" / "tiny" / "lora.yaml"), f"storage={storage}",
              f"data.train={s3_data['train']}", f"data.eval={s3_data['eval']}", "--profile", "cpu-8",
              "--image", "registry.example/ftlaunch:1"]
    out = tmp_path / "bare.yaml"
    assert main(["render", "k8s", *common, "--out", str(out)]) == 0
    assert "the pods get no S3 credentials from the spec; add env: AWS_ACCESS_KEY_ID: secret:NAME/KEY" in (
        capsys.readouterr().err)
    out = tmp_path / "rayjob.yaml"
    assert main(["render", "k8s", *common, "env.AWS_ACCESS_KEY_ID=secret:s3-creds/access-key",
                 "env.AWS_SECRET_ACCESS_KEY=secret:s3-creds/secret-key", "--out", str(out)]) == 0
    assert "S3 credentials" not in capsys.readouterr().err
    doc = yaml.safe_load(out.read_text())
    assert validate_manifest(doc) == [] and security_problems(doc) == [] and mount_problems(doc) == []
    assert doc["metadata"]["annotations"]["ftlaunch/run-dir"].startswith("s3://ftl-k8s/runs/tiny-lora-")
    cluster = doc["spec"]["rayClusterSpec"]
    for template in (cluster["headGroupSpec"]["template"], cluster["workerGroupSpecs"][0]["template"]):
        assert "persistentVolumeClaim" not in json.dumps(template)  # no PVC: the run goes to the bucket
        env = {e["name"]: e for e in template["spec"]["containers"][0]["env"]}
        assert env["AWS_ACCESS_KEY_ID"]["valueFrom"] == {"secretKeyRef": {"name": "s3-creds", "key": "access-key"}}
        assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "s3-creds"
    assert "ftlaunch-test-secret" not in out.read_text()  # this environment's key is written nowhere


def _remote_files(s3_server, bucket: str, prefix: str) -> dict[str, int]:
    import pyarrow.fs as pafs

    infos = s3_server.filesystem().get_file_info(pafs.FileSelector(f"{bucket}/{prefix}", recursive=True))
    return {i.path[len(bucket) + len(prefix) + 2:]: i.size for i in infos if i.type == pafs.FileType.File}


def test_a_run_in_s3_is_written_stopped_resumed_and_read_there_with_no_local_run_folder(
        ray_head, tiny_spec, s3_server, s3_data, mlflow_server, tmp_path, monkeypatch):
    from common.runfolder import read_jsonl
    from common.runstore import local_run
    from tests.integration.test_faults import steps_of
    from tests.integration.test_jobs import cli

    local_storage = Path(tiny_spec["storage"])
    storage = s3_server.uri(s3_server.bucket("ftl-runs"), "team/runs")
    # Its data from the bucket too: train as JSON lines, eval and retain as Parquet.
    tiny_spec.update(storage=storage, data={"train": s3_data["train_jsonl"], "eval": s3_data["eval"],
                                            "retain": s3_data["retain"]})
    # Long enough that the stop (at the first report, seen in the bucket some seconds after it
    # was written) lands mid-training: a 30-step run had ended its training by then.
    tiny_spec["train"].update(max_steps=200, report_every=20, grad_accumulation=2)
    # Tracked in MLflow (the session's server) and W&B offline (its files go in the run folder).
    tiny_spec["tracking"] = {"mlflow": {"uri": mlflow_server.uri, "experiment": "s3-run"},
                             "wandb": {"project": "ftl", "mode": "offline"}}
    handle = launcher.submit(tiny_spec, "ray", address=ray_head.address, submission_id="ft-s3-run")
    uri = handle.run_dir
    assert uri.startswith("s3://ftl-runs/team/runs/ft-s3-run?"), uri
    deadline = time.monotonic() + 240
    while not steps_of(local_run(uri)) and time.monotonic() < deadline:  # the first report, read from S3
        time.sleep(1)
    assert handle.stop() and handle.wait(timeout=120) == "STOPPED"
    stopped = _remote_files(s3_server, "ftl-runs", "team/runs/ft-s3-run")
    assert {"manifest.json", "metrics.jsonl", "logs/driver.log"} <= set(stopped), stopped
    assert any(k.startswith("checkpoint_") for k in stopped), stopped  # Ray Train's, in the bucket

    # Resume by run id under the storage URI (the CLI, as a user would): the run continues from
    # its checkpoint in the bucket; every step is reported once.
    out = cli("resume", "ft-s3-run", "--target", "ray", "--address", ray_head.address, "--storage", storage)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:] + (
        local_run(uri) / "logs" / "driver.log").read_text()[-8000:]
    manifest = json.loads((local_run(uri) / "manifest.json").read_text())
    assert manifest["status"] == "SUCCEEDED" and len(manifest["attempts"]) == 2, manifest.get("error")
    assert steps_of(local_run(uri)) == list(range(20, 220, 20))
    summary = manifest["summary"]
    assert summary["checkpoints_removed_bytes"] > 0
    assert summary["eval_loss_after"] < summary["eval_loss_before"], summary  # eval read from S3 too
    done = _remote_files(s3_server, "ftl-runs", "team/runs/ft-s3-run")
    # Ray Train's checkpoint folders were pruned from the bucket; no temporary was left there.
    assert not [k for k in done if k.startswith("checkpoint_0") or "pending" in k or k.startswith(".adapter")], done
    assert done["adapter/adapter_model.safetensors"] > 0 and "logs/worker-0.log" in done

    # The resume continued the same MLflow run: one run, its loss at every step as metrics.jsonl
    # has it, the export among its artifacts; W&B's offline run: one id, a file per attempt.
    client = mlflow_server.client()
    experiment = client.get_experiment_by_name("s3-run")
    runs = client.search_runs([experiment.experiment_id], "tags.`ftlaunch.run_id` = 'ft-s3-run'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", [r.info for r in runs]
    assert runs[0].info.run_id == manifest["tracking"]["mlflow"]["run_id"]
    records = read_jsonl(local_run(uri) / "metrics.jsonl")
    for key in ("loss", "eval_loss"):  # a step the resume redid: its later value (MLflow keeps both)
        history = sorted(client.get_metric_history(runs[0].info.run_id, key), key=lambda m: m.timestamp)
        assert sorted({m.step: m.value for m in history}.items()) == [(r["step"], r[key]) for r in records], key
    assert "adapter" in {f.path for f in client.list_artifacts(runs[0].info.run_id)}
    from jobs.wandbfile import history, offline_runs

    offline = offline_runs(local_run(uri))
    assert list(offline) == ["ft-s3-run"] and len(offline["ft-s3-run"]) == 2, offline
    assert [row["_step"] for f in offline["ft-s3-run"] for row in history(f)] == list(range(20, 220, 20))

    # Every verb reads it there: status, report (written back to the bucket), infer.
    out = cli("status", "ft-s3-run", "--target", "ray", "--address", ray_head.address, "--storage", storage)
    assert out.returncode == 0 and "SUCCEEDED" in out.stdout, out.stdout + out.stderr
    out = cli("list", "--target", "ray", "--address", ray_head.address, "--storage", storage)
    rows = [line for line in out.stdout.splitlines() if "ft-s3-run" in line]
    assert out.returncode == 0 and len(rows) == 1 and "SUCCEEDED" in rows[0], out.stdout + out.stderr
    out = cli("report", "ft-s3-run", "--storage", storage)
    assert out.returncode == 0, out.stderr
    assert "report/report.md" in _remote_files(s3_server, "ftl-runs", "team/runs/ft-s3-run")
    out = cli("infer", uri, "--input", "letters from c: c", "--max-new-tokens", "4")
    from launcher.inference import RunModel

    expected = RunModel(local_run(uri)).generate(["letters from c: c"], max_new_tokens=4)
    assert out.returncode == 0 and out.stdout == f"{expected[0]}\n", out.stderr  # the bucket's adapter
    assert not local_storage.exists()  # nothing was written to a local runs/ folder


def test_adapters_list_and_stored_logs_read_the_runs_in_a_bucket(s3_server, tmp_path):
    # A multitask run's folder as its driver pushes it (manifest, registry, adapter, logs), the
    # registry written by the job's own writer; the client reads it by the storage URI alone.
    from common.runstore import Mirror
    from launcher.registry import register
    from tests.integration.test_jobs import cli

    storage = s3_server.uri(s3_server.bucket("ftl-registry"), "runs")
    run = Mirror(s3_server.uri("ftl-registry", "runs/mt-1"), tmp_path / "driver" / "mt-1")
    (run.local / "manifest.json").write_text(json.dumps({"run_id": "mt-1", "kind": "multitask", "started": 1}))
    (run.local / "adapters" / "alphabet").mkdir(parents=True)
    (run.local / "adapters" / "alphabet" / "adapter_model.safetensors").write_bytes(b"w" * 64)
    register(run.local, "alphabet", {"path": "adapters/alphabet", "steps": 30}, {"id": "tiny"}, "tokenizer")
    (run.local / "logs").mkdir()
    (run.local / "logs" / "driver.log").write_text("=== attempt 1 submission mt-1\n[ftlaunch] step 30/30\n")
    (run.local / "logs" / "worker-0.log").write_text("=== worker-0 pid 7\n")
    plain = Mirror(s3_server.uri("ftl-registry", "runs/ft-1"), tmp_path / "driver" / "ft-1")
    (plain.local / "manifest.json").write_text(json.dumps({"run_id": "ft-1", "kind": "finetune", "started": 2}))
    assert run.push() == 5 and plain.push() == 1

    out = cli("adapters", "list", "--storage", storage, "--json", env={"FTLAUNCH_HOME": str(tmp_path / "client")})
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [(r["run"], r["task"], r["steps"], r["bytes"]) for r in rows] == [("mt-1", "alphabet", 30, 64)]
    out = cli("adapters", "list", "mt-1", "--storage", storage, env={"FTLAUNCH_HOME": str(tmp_path / "client")})
    assert out.returncode == 0 and "alphabet" in out.stdout, out.stderr
    # The cluster is gone: `logs` reads the run's stored logs from the bucket.
    out = cli("logs", "mt-1", "--storage", storage, "--address", "http://127.0.0.1:9", "--workers",
              env={"FTLAUNCH_HOME": str(tmp_path / "client")})
    assert out.returncode == 0 and "cannot reach a Ray cluster" in out.stderr, out.stderr
    assert "[ftlaunch] step 30/30" in out.stdout and "--- worker-0.log\n=== worker-0 pid 7" in out.stdout


def test_the_last_records_of_a_run_in_s3_reach_its_tracker_though_no_push_had_carried_them_yet(
        s3_server, mlflow_server, tmp_path, monkeypatch):
    """The driver's tracking reads a run in object storage from the store; at the run's end it
    pushes this node's records first. Before, the run's last report (written by its worker after
    the last periodic push) reached the store only after the tracker had closed its run: an MLflow
    history lacked the final step (seen on CI)."""
    from jobs.artifacts import RunDir
    from jobs.tracking import Tracking
    from tests.integration.test_tracking import _append, _plan, _record

    monkeypatch.setenv("FTLAUNCH_SCRATCH", str(tmp_path / "node"))
    run_id = "trk-20261207-000000-s3last"
    run_dir = RunDir(s3_server.uri(s3_server.bucket("ftl-track"), f"runs/{run_id}"))
    run_dir.fresh_mirror()
    run_dir.update_manifest(run_id=run_id, status="RUNNING")
    tracking = Tracking({"mlflow": {"uri": mlflow_server.uri, "experiment": "trk-s3-last"}},
                        _plan(run_id), run_dir, attempt=1)
    tracking.open()
    _append(run_dir, "metrics.jsonl", _record(1, 2.0, stage="sft"), _record(2, 1.5, stage="sft"))  # not pushed
    tracking.end("FAILED")
    client = mlflow_server.client()
    runs = client.search_runs([client.get_experiment_by_name("trk-s3-last").experiment_id], "")  # the stage's child run
    steps = sorted({m.step for r in runs for m in client.get_metric_history(r.info.run_id, "loss")})
    assert steps == [1, 2], [r.info for r in runs]
