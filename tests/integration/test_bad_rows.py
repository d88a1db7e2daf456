"""Bad rows in the middle of a stream (issue 20 item 4), on the session's Ray head: through Ray
Data (read, encode, the consumer's count), and in jobs that meet them after a checkpoint: the job
ends FAILED with one line naming the file and the line or row group, what it wrote stays, and a
resume after the fix finishes; `data.skip_bad_rows` skips and counts them.

A corrupt Parquet row group is made by zeroing bytes of its compressed page (what a torn copy or
a bad disk leaves); the pre-flight reads footers, so it passes the plan and fails in the stream."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import launcher
from jobs import text as T
from jobs.data import ingest
from jobs.data.badrows import BadRowsError, RowGuard
from jobs.data.read import read_dataset
from launcher.spec import DataSpec, ModelSpec
from tests.integration.test_jobs import cli
from tests.unit.test_badrows import corrupt_row_group, texts

pytestmark = pytest.mark.integration
MODEL = ModelSpec(source="tiny-llama", seq_len=16)


def jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    return str(path)


def stream(path: str, data: DataSpec, micro: int = 4) -> tuple[list, RowGuard]:
    guard = RowGuard(data, [path], ["text"])
    ds = T.stream(read_dataset(path, columns=["text"]), MODEL, data, MODEL.seq_len)
    return list(ingest.micro_batches(ds.iterator(), micro, MODEL.seq_len, guard=guard)), guard


def test_bad_rows_are_skipped_up_to_the_limit_and_the_rest_trained_on_as_if_they_were_not_there(ray_local, tmp_path):
    rows = texts(40)
    bad = [*rows[:10], None, *rows[10:20], 17, *rows[20:30], "x" * 200, *rows[30:]]
    path = jsonl(tmp_path / "train.jsonl", bad)
    got, guard = stream(path, DataSpec(train=path, skip_bad_rows=3, max_row_chars=100))
    clean = jsonl(tmp_path / "clean.jsonl", rows)
    want, _ = stream(clean, DataSpec(train=clean))
    assert guard.skipped == 3 and len(got) == len(want) == 10
    assert all(a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a) for a, b in zip(got, want))


def test_past_the_limit_the_stream_ends_with_the_file_and_line_after_the_rows_before_it(ray_local, tmp_path):
    rows = texts(30)
    path = jsonl(tmp_path / "train.jsonl", [*rows[:21], None, *rows[21:]])
    guard = RowGuard(DataSpec(train=path), [path], ["text"])
    ds = T.stream(read_dataset(path, columns=["text"]), MODEL, DataSpec(train=path), MODEL.seq_len)
    seen = []
    with pytest.raises(BadRowsError) as err:
        for batch in ingest.micro_batches(ds.iterator(), 4, MODEL.seq_len, guard=guard):
            seen.append(batch)
    assert len(seen) == 5  # the 21 good rows before it: five whole micro-batches
    assert str(err.value).startswith(f"bad row in the train data: {path} line 22: text is null; fix or remove it")


def test_a_corrupt_row_group_and_a_line_that_is_not_json_are_named_where_they_are(ray_local, tmp_path):
    corrupt = tmp_path / "corrupt.parquet"
    pq.write_table(pa.table({"text": texts(400)}), corrupt, row_group_size=100, compression="zstd",
                   use_dictionary=False)
    corrupt_row_group(corrupt, 3)
    with pytest.raises(BadRowsError, match=f"bad data in the train split: {corrupt} row group 3 "
                       r"\(rows 300-399\): does not decode \("):
        stream(str(corrupt), DataSpec(train=str(corrupt)))
    # A JSON lines file that changed after the plan (the pre-flight reads every line of it).
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"text": "a"}) + "\n" + '{"text": "b\n' + json.dumps({"text": "c"}) + "\n")
    with pytest.raises(BadRowsError, match=f"{path} line 2: not JSON"):
        stream(str(path), DataSpec(train=str(path)))


def test_the_classification_stream_marks_a_null_text_and_a_null_or_wrong_label_as_bad_rows(ray_local, tmp_path):
    # A null text was trained on as "None", a null label failed the cast deep in a Ray Data task.
    from jobs import components as C

    minilm = ModelSpec(source="minilm", num_labels=4, seq_len=16)
    good = [{"text": t, "label": i % 4} for i, t in enumerate(texts(24))]
    bad = [*good[:5], {"text": None, "label": 1}, *good[5:12], {"text": "a fine text", "label": None},
           *good[12:18], {"text": "another", "label": "pos"}, *good[18:]]

    def classified(rows, data, name):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        data = data.model_copy(update={"train": str(path)})
        ds = read_dataset(str(path), columns=["text", "label"]).map_batches(
            C.tokenize_classification, batch_format="numpy",
            fn_kwargs={"seq_len": minilm.seq_len, "model_spec": minilm, "data": data})
        guard = RowGuard(data, [str(path)], ["text", "label"])
        return list(ingest.micro_batches(ds.iterator(), 4, minilm.seq_len, guard=guard)), guard, path

    spec = DataSpec(train="x", task="classification", skip_bad_rows=3)
    got, guard, _ = classified(bad, spec, "bad")
    want, _, _ = classified(good, spec, "good")
    assert guard.skipped == 3 and len(got) == len(want) == 6  # the rest as if the bad rows were not there
    assert all(all((a[k] == b[k]).all() for k in a) for a, b in zip(got, want))
    with pytest.raises(BadRowsError) as err:
        classified(bad, spec.model_copy(update={"skip_bad_rows": 0}), "refused")
    assert str(err.value).startswith(f"bad row in the train data: {tmp_path / 'refused.jsonl'} line 6: "
                                     "text is null; fix or remove it"), err.value


def one_worker(tiny_spec: dict, train: str, **train_fields) -> dict:
    tiny_spec["data"] = {**tiny_spec["data"], "train": train}
    tiny_spec["train"].update(max_steps=60, report_every=10, micro_batch=16, **train_fields)
    tiny_spec["resources"] = {"workers": 1, "cpus_per_worker": 1}  # one stream: rows in file order
    return tiny_spec


def demo_texts(demo_data) -> list[str]:
    return pq.read_table(demo_data["train"], columns=["text"]).column("text").to_pylist()


def test_a_job_that_meets_a_bad_row_fails_with_its_line_keeps_its_checkpoint_and_resumes_after_the_fix(
        ray_head, tiny_spec, demo_data, tmp_path):
    rows = demo_texts(demo_data)
    path = tmp_path / "train.jsonl"
    jsonl(path, [*rows[:800], None, *rows[800:]])  # 50 steps of 16 rows, then the bad one
    spec = one_worker(tiny_spec, str(path))
    handle = launcher.submit(spec, "ray", address=ray_head.address, submission_id="bad-row-null")
    assert handle.wait(timeout=300) == "FAILED"
    run_dir = Path(handle.run_dir)
    manifest = handle.manifest()
    assert manifest["error"] == (f"bad row in the train data: {path} line 801: text is null; fix or remove it, or "
                                 "set data.skip_bad_rows: N to skip up to N bad rows (they are counted in the summary)")
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [10, 20, 30, 40, 50]  # every row before it trained on, and reported
    checkpoints = sorted(p for p in run_dir.glob("**/checkpoint_*") if p.is_dir())
    assert checkpoints and all(any(c.iterdir()) for c in checkpoints)

    jsonl(path, [*rows[:800], "the fixed row", *rows[800:]])  # the fix, then resume: from step 50
    out = cli("resume", str(run_dir), "--address", ray_head.address)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "SUCCEEDED" and manifest["summary"]["steps"] == 60
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [10, 20, 30, 40, 50, 60]


def test_a_job_skips_bad_rows_up_to_skip_bad_rows_and_counts_them_in_the_summary(ray_head, tiny_spec, demo_data,
                                                                                  tmp_path):
    rows = demo_texts(demo_data)
    path = tmp_path / "train.jsonl"
    # (a number among the first 256 rows is refused at plan: the plan infers the file's types from them)
    jsonl(path, [*rows[:100], None, *rows[100:300], 3.5, *rows[300:400], "x" * 5000, *rows[400:]])
    spec = one_worker(tiny_spec, str(path))
    spec["data"].update(skip_bad_rows=3, max_row_chars=4000)
    # The eval split's bad rows are dropped (not evaluated as "None") and counted on their own.
    spec["data"]["eval"] = jsonl(tmp_path / "eval.jsonl", [*rows[:20], None, *rows[20:40]])
    handle = launcher.submit(spec, "ray", address=ray_head.address, submission_id="bad-rows-skipped")
    assert handle.wait(timeout=300) == "SUCCEEDED", handle.logs()[-3000:]
    summary = handle.manifest()["summary"]
    assert summary["bad_rows_skipped"] == 3 and summary["steps"] == 60
    assert summary["eval_bad_rows_skipped"] == 1


def test_a_job_whose_parquet_row_group_does_not_decode_fails_naming_it(ray_head, tiny_spec, demo_data, tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"text": demo_texts(demo_data)}), path, row_group_size=300, compression="zstd",
                   use_dictionary=False)
    corrupt_row_group(path, 2)
    spec = one_worker(tiny_spec, str(path))
    handle = launcher.submit(spec, "ray", address=ray_head.address, submission_id="bad-row-group")
    assert handle.wait(timeout=300) == "FAILED"
    error = handle.manifest()["error"]
    assert error.startswith(f"bad data in the train split: {path} row group 2 (rows 600-899): does not decode"), error
    assert error.endswith("fix or remove it (a row group or line that does not decode cannot be skipped)")
