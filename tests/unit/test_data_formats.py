"""JSON lines and `datasets.save_to_disk` folders are checked like Parquet: rows, columns, types,
and a bad line named by file and number, one line each, before any job starts."""

import gzip
import json

import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from launcher.datacheck import check_dataset
from launcher.errors import ConfigError

ROWS = [{"instruction": f"reverse: {i} {i + 1}", "response": f"{i + 1} {i}"} for i in range(40)]


def write_jsonl(path, rows, gz=False):
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def save_to_disk(folder, table):
    """The layout `datasets.Dataset.save_to_disk` writes: Arrow stream files named in state.json."""
    folder.mkdir()
    with ipc.new_stream(folder / "data-00000-of-00001.arrow", table.schema) as w:
        w.write_table(table)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}],
                                                   "_split": "train"}))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {}}))
    return folder


def test_jsonl_plain_gzipped_and_in_a_folder_count_their_rows(tmp_path):
    assert check_dataset(write_jsonl(tmp_path / "a.jsonl", ROWS), "instruction").rows == 40
    assert check_dataset(write_jsonl(tmp_path / "b.jsonl.gz", ROWS, gz=True), "instruction").rows == 40
    (tmp_path / "d").mkdir()
    write_jsonl(tmp_path / "d" / "x.jsonl", ROWS[:10])
    write_jsonl(tmp_path / "d" / "y.json", ROWS[10:])
    info = check_dataset(tmp_path / "d", "instruction")
    assert (info.rows, info.files) == (40, 2)


def test_a_save_to_disk_folder_reads_its_listed_stream_files(tmp_path):
    folder = save_to_disk(tmp_path / "saved", pa.Table.from_pylist(ROWS))
    info = check_dataset(folder, "instruction")
    assert (info.rows, info.files) == (40, 1)  # state.json and dataset_info.json are not data


@pytest.mark.parametrize("line,says", [
    ("{not json", "line 3 is not JSON"),
    ("[1, 2]", "line 3 is a JSON list, not an object"),
])
def test_a_bad_line_is_named_by_file_and_number(tmp_path, line, says):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n" + line + "\n")
    with pytest.raises(ConfigError) as exc:
        check_dataset(path, "instruction")
    assert len(exc.value.problems) == 1
    assert f"{path} {says}" in exc.value.problems[0] and "fix that line" in exc.value.problems[0]


def test_missing_columns_and_wrong_types_in_jsonl_name_the_column(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"question": "x", "response": "y"}] * 20)
    with pytest.raises(ConfigError, match="has no column 'instruction'"):
        check_dataset(path, "instruction")
    path = write_jsonl(tmp_path / "b.jsonl", [{"instruction": 3, "response": "y"}] * 20)
    with pytest.raises(ConfigError, match="column 'instruction' .* is int64, task instruction needs a string"):
        check_dataset(path, "instruction")
