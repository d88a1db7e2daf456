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


@pytest.fixture(scope="module")
def s3_data(s3_server, demo_data, tmp_path_factory):
    """The demo splits in a bucket (Parquet), and the train split again as JSON lines."""
    import pyarrow.parquet as pq

    bucket = s3_server.bucket("ftl-data")
    uris = {role: s3_server.upload(path, bucket, f"demo/{Path(path).name}") for role, path in demo_data.items()}
    jsonl = tmp_path_factory.mktemp("jsonl") / "train.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in pq.read_table(demo_data["train"]).to_pylist()))
    uris["train_jsonl"] = s3_server.upload(jsonl, bucket, "jsonl/train.jsonl")
    return uris


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
    with pytest.raises(launcher.PlanError, match="not rendered for --target k8s yet"):
        launcher.plan(validate(tiny_spec), "k8s", preflight=False)


def _remote_files(s3_server, bucket: str, prefix: str) -> dict[str, int]:
    import pyarrow.fs as pafs

    infos = s3_server.filesystem().get_file_info(pafs.FileSelector(f"{bucket}/{prefix}", recursive=True))
    return {i.path[len(bucket) + len(prefix) + 2:]: i.size for i in infos if i.type == pafs.FileType.File}


def test_a_run_in_s3_is_written_stopped_resumed_and_read_there_with_no_local_run_folder(
        ray_head, tiny_spec, s3_server, s3_data, tmp_path, monkeypatch):
    from common.runstore import local_run
    from tests.integration.test_faults import steps_of
    from tests.integration.test_jobs import cli

    local_storage = Path(tiny_spec["storage"])
    storage = s3_server.uri(s3_server.bucket("ftl-runs"), "team/runs")
    # Its data from the bucket too: train as JSON lines, eval and retain as Parquet.
    tiny_spec.update(storage=storage, data={"train": s3_data["train_jsonl"], "eval": s3_data["eval"],
                                            "retain": s3_data["retain"]})
    tiny_spec["train"].update(max_steps=30, report_every=10)
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
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    manifest = json.loads((local_run(uri) / "manifest.json").read_text())
    assert manifest["status"] == "SUCCEEDED" and len(manifest["attempts"]) == 2, manifest.get("error")
    assert steps_of(local_run(uri)) == [10, 20, 30]
    summary = manifest["summary"]
    assert summary["checkpoints_removed_bytes"] > 0
    assert summary["eval_loss_after"] < summary["eval_loss_before"], summary  # eval read from S3 too
    done = _remote_files(s3_server, "ftl-runs", "team/runs/ft-s3-run")
    # Ray Train's checkpoint folders were pruned from the bucket; no temporary was left there.
    assert not [k for k in done if k.startswith("checkpoint_0") or "pending" in k or k.startswith(".adapter")], done
    assert done["adapter/adapter_model.safetensors"] > 0 and "logs/worker-0.log" in done

    # Every verb reads it there: status, report (written back to the bucket), infer.
    out = cli("status", "ft-s3-run", "--target", "ray", "--address", ray_head.address, "--storage", storage)
    assert out.returncode == 0 and "SUCCEEDED" in out.stdout, out.stdout + out.stderr
    out = cli("report", "ft-s3-run", "--storage", storage)
    assert out.returncode == 0, out.stderr
    assert "report/report.md" in _remote_files(s3_server, "ftl-runs", "team/runs/ft-s3-run")
    out = cli("infer", uri, "--input", "letters from c:", "--max-new-tokens", "4")
    assert out.returncode == 0 and out.stdout.strip(), out.stderr
    assert not local_storage.exists()  # nothing was written to a local runs/ folder
