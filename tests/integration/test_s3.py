"""Data in object storage, against a real S3 API server on loopback (moto's, started by the test
session; tests/s3server.py): the pre-flight reads footers and first lines through pyarrow's S3
filesystem, a missing object or bucket is one line at plan, and a job on the session's head
streams its train, eval and retain splits from the bucket."""

from __future__ import annotations

import json
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


def test_a_finetune_streams_its_splits_from_s3(ray_head, tiny_spec, s3_data):
    tiny_spec["data"] = {"train": s3_data["train_jsonl"], "eval": s3_data["eval"], "retain": s3_data["retain"]}
    tiny_spec["train"].update(max_steps=20, report_every=10)
    handle = launcher.submit(tiny_spec, "ray", address=ray_head.address, submission_id="ft-s3-data")
    assert handle.wait(timeout=300) == "SUCCEEDED", handle.logs()[-3000:]
    summary = handle.manifest()["summary"]
    assert summary["steps"] == 20
    # The eval split came from the bucket too: measured before and after, and the loss fell.
    assert summary["eval_loss_after"] < summary["eval_loss_before"], summary
