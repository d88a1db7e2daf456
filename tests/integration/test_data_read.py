"""Datasets named by folder, glob, file:// URI and Arrow IPC are read like the pre-flight saw them."""

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

from launcher.datacheck import check_dataset

pytestmark = pytest.mark.integration



def test_folder_glob_uri_and_ipc_read_the_checked_rows(ray_local, tmp_path):
    from jobs.data.read import read_dataset

    for i in range(3):
        pq.write_table(pa.table({"text": [f"p{i}-{j}" for j in range(10)]}), tmp_path / f"part-{i}.parquet")
    with ipc.new_file(tmp_path / "extra.arrow", pa.schema([("text", pa.string())])) as w:
        w.write_table(pa.table({"text": [f"ipc-{j}" for j in range(5)]}))
    for ref in (str(tmp_path), f"{tmp_path}/part-*.parquet", f"file://{tmp_path}", str(tmp_path / "extra.arrow")):
        ds = read_dataset(ref, columns=["text"])
        assert ds.count() == check_dataset(ref, "causal_lm").rows, ref
    assert sorted(read_dataset(str(tmp_path)).to_pandas()["text"])[:1] == ["ipc-0"]


def test_jsonl_gz_and_save_to_disk_stream_the_checked_rows(ray_local, tmp_path):
    from jobs.data.read import read_dataset
    from tests.unit.test_data_formats import ROWS, save_to_disk, write_jsonl

    refs = [write_jsonl(tmp_path / "a.jsonl", ROWS), write_jsonl(tmp_path / "b.jsonl.gz", ROWS, gz=True),
            save_to_disk(tmp_path / "saved", pa.Table.from_pylist(ROWS))]
    for ref in map(str, refs):
        ds = read_dataset(ref, columns=["instruction", "response"])
        assert ds.count() == check_dataset(ref, "instruction").rows == 40, ref
        assert sorted(ds.to_pandas()["response"])[0] == "1 0"
