"""Bad rows (issue 20 item 4), without Ray: what is bad, the marker rows encode leaves in their
places, where the first bad row is found, and the consumer's count against data.skip_bad_rows.
The stream through Ray Data and a job that meets them: tests/integration/test_bad_rows.py."""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import text as T
from jobs.data.badrows import BAD_COLUMN, BadRowsError, RowGuard, first_bad, row_problem, skipped_rows
from launcher.spec import DataSpec, ModelSpec

MODEL = ModelSpec(source="tiny-llama", seq_len=16)


def data(path="x.parquet", **kw) -> DataSpec:
    return DataSpec(train=str(path), **kw)


def corrupt_row_group(path, group: int) -> None:
    """Overwrite the start of one row group's data page (its page header) with garbage: that row
    group no longer decodes, the footer and the other row groups still do."""
    column = pq.ParquetFile(path).metadata.row_group(group).column(0)
    raw = bytearray(path.read_bytes())
    at = column.data_page_offset
    raw[at:at + 24] = b"\xff" * 24
    path.write_bytes(bytes(raw))


def texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice("abcdefgh ") for _ in range(80)) for _ in range(n)]


@pytest.mark.parametrize("row, problem", [
    ({"text": None}, "text is null"),
    ({"text": 7}, "text is a number, not a string"),
    ({"text": "x" * 101}, "text has 101 characters, over data.max_row_chars 100"),
    ({"text": "fine"}, None),
])
def test_a_causal_lm_row_is_bad_when_its_text_is_null_not_a_string_or_too_long(row, problem):
    assert row_problem(row, data(max_row_chars=100)) == problem


def test_classification_and_vqa_rows_are_bad_when_a_label_or_a_part_is_missing_or_the_wrong_kind():
    cls = data(task="classification")
    assert row_problem({"text": "t", "label": None}, cls) == "label is null"
    assert row_problem({"text": "t", "label": float("nan")}, cls) == "label is null"  # a stream's null
    assert row_problem({"text": "t", "label": "pos"}, cls) == "label is a str ('pos'), not a class number"
    assert row_problem({"text": "t", "label": 1.5}, cls) == "label is a number (1.5), not a class number"
    assert row_problem({"text": None, "label": 1}, cls) == "text is null"
    assert row_problem({"text": "t", "label": 2}, cls) is None and row_problem({"text": "t", "label": 2.0}, cls) is None
    vqa = data(task="vqa")
    assert row_problem({"image": b"png", "question": None, "answer": "red"}, vqa) == "question is null"
    assert row_problem({"image": None, "question": "q", "answer": "red"}, vqa) == "image is null"
    assert row_problem({"image": b"png", "question": "q", "answer": 3}, vqa) == "answer is a number, not a string"
    assert row_problem({"image": b"png", "question": "q", "answer": "red"}, vqa) is None


def test_a_stream_without_marker_rows_names_its_failed_read_by_the_first_bad_row(tmp_path):
    from jobs.data.badrows import named_failures

    path = tmp_path / "vqa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [
        {"image": "a", "question": "q", "answer": "red"}, {"image": "b", "question": None, "answer": "red"}]))

    def batches():  # a VQA batch function's failure on the null question, deep in a Ray Data task
        yield 1
        raise TypeError("TextEncodeInput must be Union[TextInputSequence, ...]")

    stream = named_failures(batches(), data(path, task="vqa"))
    assert next(stream) == 1
    with pytest.raises(BadRowsError, match=rf"^bad row in the train data: {path} line 2: question is null; "
                       r"fix or remove it \(a vqa stream cannot skip rows\)$"):
        next(stream)
    clean = tmp_path / "clean.jsonl"
    clean.write_text(json.dumps({"image": "a", "question": "q", "answer": "red"}) + "\n")

    def broken():  # no bad row in the file: the error is not the data's, and goes on as it was
        raise RuntimeError("the object store is full")
        yield

    with pytest.raises(RuntimeError, match="object store is full"):
        next(named_failures(broken(), data(clean, task="vqa")))


def test_instruction_and_chat_rows_are_bad_when_their_parts_are_not_strings():
    inst = data(task="instruction")
    assert row_problem({"instruction": "q", "response": None}, inst) == "response is null"
    assert row_problem({"instruction": ["q"], "response": "a"}, inst) == "instruction is a list, not a string"
    assert row_problem({"instruction": "q", "response": "a"}, inst) is None
    chat = data(task="chat")
    assert row_problem({"messages": None}, chat) == "messages is null"
    assert "content is a number" in row_problem({"messages": [{"role": "user", "content": 3}]}, chat)
    assert "role 'robot'" in row_problem({"messages": [{"role": "robot", "content": "hi"}]}, chat)
    assert row_problem({"messages": [{"role": "user", "content": "hi"},
                                     {"role": "assistant", "content": "yo"}]}, chat) is None


def test_encode_leaves_a_marker_row_in_each_bad_rows_place_and_encodes_the_rest_as_alone():
    spec = data()
    batch = {"text": np.array(["good one", None, 5, "good two"], dtype=object)}
    out = T.encode(batch, MODEL, spec, 16, mark_bad=True)
    assert out[BAD_COLUMN].tolist() == [0, 1, 1, 0]
    alone = T.encode({"text": np.array(["good one", "good two"], dtype=object)}, MODEL, spec, 16)
    for k, v in alone.items():
        assert np.array_equal(out[k][[0, 3]], v), k
    assert not out["attention_mask"][[1, 2]].any() and (out["labels"][[1, 2]] == T.IGNORE).all()
    assert BAD_COLUMN not in T.encode({"text": np.array(["a"], dtype=object)}, MODEL, spec, 16)  # in-process


def test_packing_keeps_the_markers_as_rows_after_the_packed_ones():
    spec = data(packing=True)
    batch = {"text": np.array(["aa", None, "bb", None, "cc"], dtype=object)}
    enc = T.encode(batch, MODEL, spec, 16, mark_bad=True)
    packed = T.pack(enc, 16, 0)
    good = T.pack(T.encode({"text": np.array(["aa", "bb", "cc"], dtype=object)}, MODEL, spec, 16), 16, 0)
    n = len(good["input_ids"])
    assert packed[BAD_COLUMN].tolist() == [0] * n + [1, 1]
    for k, v in good.items():
        assert np.array_equal(packed[k][:n], v), k
    assert not packed["attention_mask"][n:].any()


def test_the_first_bad_row_is_found_by_file_and_row_group_or_line(tmp_path):
    corrupt = tmp_path / "corrupt.parquet"
    pq.write_table(pa.table({"text": texts(400)}), corrupt, row_group_size=100, compression="zstd",
                   use_dictionary=False)
    corrupt_row_group(corrupt, 2)
    found = first_bad([str(corrupt)], data(corrupt), ["text"])
    assert found.startswith(f"{corrupt} row group 2 (rows 200-299): does not decode"), found

    nulls = tmp_path / "nulls.parquet"
    rows = texts(300)
    rows[150] = None
    pq.write_table(pa.table({"text": rows}), nulls, row_group_size=100)
    assert first_bad([str(nulls)], data(nulls), ["text"]) == f"{nulls} row group 1, row 150: text is null"

    lines = tmp_path / "train.jsonl"
    lines.write_text(json.dumps({"text": "a"}) + "\n\n" + '{"text": "b"\n' + json.dumps({"text": "c"}) + "\n")
    assert first_bad([str(lines)], data(lines), None).startswith(f"{lines} line 3: not JSON")
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"text": "a"}) + "\n")
    assert first_bad([str(good)], data(good), None) is None


def marked(flags: list[int]) -> pa.Table:
    return pa.table({"input_ids": list(range(len(flags))), BAD_COLUMN: flags})


def test_the_guard_drops_and_counts_markers_up_to_the_limit_then_names_the_first_bad_row(tmp_path):
    lines = tmp_path / "train.jsonl"
    lines.write_text("\n".join(json.dumps({"text": t}) for t in ["a", None, "c", 4]) + "\n")
    guard = RowGuard(data(lines, skip_bad_rows=2), [str(lines)])
    guard.begin_pass()
    kept, error = guard.take(marked([0, 1, 0, 1]))
    assert kept.column_names == ["input_ids"] and kept.column("input_ids").to_pylist() == [0, 2]
    assert guard.skipped == 2 and error is None
    kept, error = guard.take(marked([0, 0, 1, 0]))  # the rows before the one over the limit are kept
    assert kept.column("input_ids").to_pylist() == [0, 1] and guard.skipped == 3
    assert str(error) == (f"bad row in the train data: {lines} line 2: text is null; fix or remove it, or set "
                          "data.skip_bad_rows: N to skip up to N bad rows (they are counted in the summary)")
    guard.begin_pass()  # a new pass counts afresh
    assert guard.skipped == 0


def test_the_limit_is_the_jobs_summed_over_the_workers_counts(tmp_path):
    ledger = tmp_path / "bad-rows"
    spec = data(tmp_path / "x.jsonl", skip_bad_rows=2)
    ranks = [RowGuard(spec, [], ledger=str(ledger), rank=r) for r in (0, 1)]
    for g in ranks:
        g.begin_pass()
    assert ranks[0].take(marked([1, 0]))[1] is None
    assert ranks[1].take(marked([0, 1]))[1] is None
    assert skipped_rows(ledger) == 2
    kept, error = ranks[1].take(marked([0, 1]))
    assert kept.num_rows == 1 and isinstance(error, BadRowsError)
    assert "3 bad rows, over data.skip_bad_rows 2" in str(error)  # no file to name: the count


def test_a_read_that_failed_to_decode_is_named_by_its_row_group(tmp_path):
    corrupt = tmp_path / "corrupt.parquet"
    pq.write_table(pa.table({"text": texts(200)}), corrupt, row_group_size=100, compression="zstd",
                   use_dictionary=False)
    corrupt_row_group(corrupt, 1)
    guard = RowGuard(data(corrupt), [str(corrupt)], ["text"])
    named = guard.decode_failure(OSError("ZSTD decompression failed: Data corruption detected"))
    assert str(named).startswith(f"bad data in the train split: {corrupt} row group 1 (rows 100-199)")
    assert guard.decode_failure(RuntimeError("CUDA out of memory")) is None  # not a data error: as it was


def test_the_plan_names_the_line_whose_type_differs_among_the_rows_it_infers_the_schema_from(tmp_path):
    from pyarrow import fs

    from launcher.datacheck import _jsonl_rows

    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["a", "b", 3.5, "c"]))
    with pytest.raises(ValueError, match=r"change type \(line 3: text is a number where the other rows have a string\)"):
        _jsonl_rows(fs.LocalFileSystem(), str(path))
    # With data.skip_bad_rows the job skips that row (jobs/data/read.py marks it): plan takes
    # the schema from the rows that agree, and refuses again past the limit.
    rows, schema = _jsonl_rows(fs.LocalFileSystem(), str(path), skip_bad_rows=1)
    assert rows == 4 and str(schema.field("text").type) == "string"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["a", 1, 3.5, "c", "d"]))
    with pytest.raises(ValueError, match=r"change type \(line 2: text is a number"):
        _jsonl_rows(fs.LocalFileSystem(), str(path), skip_bad_rows=1)


def test_an_eval_split_with_a_null_text_is_refused_by_row_or_skipped_within_the_limit(tmp_path):
    from jobs import components as C

    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["good one", None, "good two"]))
    with pytest.raises(BadRowsError, match=r"eval.jsonl row 2: text is null; fix or remove it"):
        C.load_split(str(path), data(path), 16)
    kept = C.load_split(str(path), data(path, skip_bad_rows=1), 16)
    assert kept == {"text": ["good one", "good two"]}  # not the string "None" in the null's place
    skipped = {}
    C.load_split(str(path), data(path, skip_bad_rows=1), 16, skipped)
    assert skipped == {str(path): 1}  # what the summary's eval_bad_rows_skipped reports


def test_a_classification_split_with_a_null_label_or_text_is_refused_by_row_or_skipped(tmp_path):
    from jobs import components as C

    path = tmp_path / "eval.jsonl"
    rows = [{"text": "fine", "label": 1}, {"text": "no label", "label": None}, {"text": None, "label": 0},
            {"text": "also fine", "label": 0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = DataSpec(task="classification", train=str(path), eval=str(path))
    with pytest.raises(BadRowsError, match=r"eval.jsonl row 2: label is null; fix or remove it"):
        C.load_split(str(path), spec, 16)
    skipped = {}
    kept = C.load_split(str(path), spec.model_copy(update={"skip_bad_rows": 2}), 16, skipped)
    assert kept == {"text": ["fine", "also fine"], "label": [1, 0]} and skipped == {str(path): 2}
