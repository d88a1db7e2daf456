"""jobs/data/ingest.py on the session's Ray head: its micro-batches are exactly those of
`iter_torch_batches(batch_size=micro, drop_last=True, dtypes=torch.long)`, in the same order, for
the column kinds the jobs stream (Ray tensor columns from map_batches, fixed-size lists read from
Parquet, plain integers), whatever the fetch size; a Stream's passes repeat; a failing read is
raised in the training thread."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from jobs.data import ingest

pytestmark = pytest.mark.integration



@pytest.fixture(autouse=True)
def in_order(monkeypatch):
    """Blocks are read in parallel; in order, two passes over one dataset see the same rows."""
    import ray.data

    monkeypatch.setattr(ray.data.DataContext.get_current().execution_options, "preserve_order", True)


def model_rows(n: int, seq: int):
    """Rows as jobs/text.py's map_batches writes them: 2-D int64 arrays (Ray tensor columns)."""
    import ray.data

    def rows(batch):
        ids = batch["id"][:, None] * seq + np.arange(seq)[None, :]
        return {"input_ids": ids, "labels": -ids, "attention_mask": np.ones_like(ids)}

    return ray.data.range(n, override_num_blocks=7).map_batches(rows, batch_format="numpy")


def reference(ds, micro):
    return list(ds.iter_torch_batches(batch_size=micro, drop_last=True, dtypes=torch.long))


def same(ours, theirs) -> bool:
    return len(ours) == len(theirs) and all(
        a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
        for a, b in zip(ours, theirs))


@pytest.mark.parametrize("micro, seq_len", [(8, 16), (5, 16), (3, 400_000)])
def test_micro_batches_are_iter_torch_batches(ray_local, micro, seq_len):
    ds = model_rows(1003, 16)  # 1003 rows: a partial last micro-batch, blocks of 143 or 144
    ours = list(ingest.micro_batches(ds.iterator(), micro, seq_len))
    assert ingest.fetch_rows(micro, seq_len) % micro == 0
    assert len(ours) == 1003 // micro
    assert same(ours, reference(ds, micro))


def test_parquet_token_lists_and_split_shard(ray_local, tmp_path):
    """int32 token ids as Parquet fixed-size lists (what a user's pre-tokenized set holds),
    streamed through streaming_split as Ray Train's shard is: int64 tensors, the same rows."""
    from jobs.data.read import read_dataset

    for i in range(3):
        ids = np.arange(i * 300 * 12, (i + 1) * 300 * 12, dtype=np.int32)
        pq.write_table(pa.table({"input_ids": pa.FixedSizeListArray.from_arrays(pa.array(ids), 12),
                                 "label": pa.array(np.arange(300) + i * 300, pa.int32())}),
                       tmp_path / f"part-{i}.parquet")
    ours = list(ingest.micro_batches(read_dataset(str(tmp_path)).streaming_split(1)[0], 16, 12))
    assert ours[0]["input_ids"].shape == (16, 12) and ours[0]["input_ids"].dtype == torch.long
    assert same(ours, reference(read_dataset(str(tmp_path)), 16))
    rows = torch.cat([b["label"] for b in ours])
    assert rows.tolist() == list(range(len(rows)))  # file order, no row lost between fetches


def test_stream_passes_repeat_and_a_failed_read_is_raised(ray_local):
    ds = model_rows(100, 4)
    stream = ingest.Stream(ds.iterator(), 8, 4)
    first, second = list(stream), list(stream)
    assert same(first, reference(ds, 8)) and same(second, first)

    def boom(batch):
        raise ValueError("row 3 is not text")

    bad = ingest.Stream(ds.map_batches(boom).iterator(), 8, 4)
    with pytest.raises(Exception, match="row 3 is not text"):
        list(bad)
