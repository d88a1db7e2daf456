import json
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def ray_local(ray_head):
    """This test process connected to the session's Ray head (Ray Data runs on it), for one module."""
    import ray

    ray.init(address=ray_head.gcs_address, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_data(s3_server, demo_data, tmp_path_factory):
    """The demo splits in a bucket (Parquet), and the train split again as JSON lines."""
    import pyarrow.parquet as pq

    bucket = s3_server.bucket("ftl-data")
    uris = {role: s3_server.upload(path, bucket, f"demo/{Path(path).name}") for role, path in demo_data.items()}
    jsonl = tmp_path_factory.mktemp("jsonl") / "train.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in pq.read_table(demo_data["train"]).to_pylist()))
    uris["train_jsonl"] = s3_server.upload(jsonl, bucket, "jsonl/train.jsonl")
    return uris


@pytest.fixture(scope="session")
def mt_data(tmp_path_factory):
    from launcher import synthetic

    out = tmp_path_factory.mktemp("mt-data")
    return {n: {"train": str(synthetic.make(n, 600, out / n, 0, "train")),
                "eval": str(synthetic.make(n, 32, out / n, 9, "eval"))}
            for n in ("counting", "alphabet", "instruction")}


@pytest.fixture(scope="session")
def vqa_data(tmp_path_factory):
    from launcher.synthetic import make

    out = tmp_path_factory.mktemp("vqa")
    return {"train": str(make("vqa", 1200, out)), "eval": str(make("vqa", 128, out, seed=1, split="eval"))}
