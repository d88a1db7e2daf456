"""Open a dataset spec (file, folder, glob or pyarrow.fs URI; Parquet, Arrow IPC, JSON lines, or a
`datasets.save_to_disk` folder) as a Ray Dataset.

The same file listing the pre-flight check used, so what was checked is what is read.
"""

from __future__ import annotations

from typing import Optional

import ray.data

from jobs.data.badrows import BAD_COLUMN
from launcher.datacheck import ARROW_IPC, is_jsonl, list_files, odd_types


def task_args(tasks: int) -> dict:
    """What each Ray Data task of a job's stream asks (read, tokenize, pack, ...): no CPU, at most
    `tasks` of a stage at once.

    A task asking a CPU waits for one outside every placement group, and jobs whose workers take
    every CPU of the cluster (two 2 x 0.5-CPU finetunes on 2 CPUs) then wait on each other for ever,
    their workers placed and their data unread. Asking none, the tasks run on the CPUs the
    workers' processes leave idle while they wait for a batch, as they do on a cluster with
    CPUs to spare; `tasks` (resources.data_tasks, default one per worker) bounds how many
    processes the stream starts."""
    return {"num_cpus": 0, "compute": ray.data.TaskPoolStrategy(size=max(1, int(tasks)))}


def stream_tasks(resources) -> int:
    """A Ray Train job's data tasks at once per stage: resources.data_tasks, else one per worker."""
    return resources.data_tasks or resources.workers


def micro_blocks(ds: ray.data.Dataset, rows: int, tasks: int) -> ray.data.Dataset:
    """`ds.repartition(target_num_rows_per_block=rows)` whose tasks ask what task_args asks: Ray's
    own takes no remote arguments and asks a CPU (Ray 2.60, the version this project pins)."""
    from ray.data._internal.logical.interfaces import LogicalPlan
    from ray.data._internal.logical.operators import StreamingRepartition

    args = task_args(tasks)
    op = StreamingRepartition(target_num_rows_per_block=rows, input_dependencies=[ds._logical_plan.dag],
                              ray_remote_args={"num_cpus": args["num_cpus"]}, compute=args["compute"])
    return ray.data.Dataset._from_parent(ds, LogicalPlan(op, ds.context))


def read_dataset(path: str, columns: Optional[list[str]] = None, role: str = "train",
                 tasks: int = 1) -> ray.data.Dataset:
    """`tasks`: read tasks at once (task_args). Every format is read by tasks of ours, one per
    file: Ray's Parquet readers start tasks that ask a CPU each (the V2 reader's file listing,
    the V1 reader's sampling) and cannot be told otherwise, and Ray Data has no streaming Arrow
    IPC reader."""
    fs, files = list_files(path, role)
    return read_files(fs, files, columns, task_args(tasks))


JSONL_CHUNK = 8 << 20  # bytes of whole lines parsed at once


def read_files(fs, files: list[str], columns: Optional[list[str]], asks: dict) -> ray.data.Dataset:
    """Data files of any format, one read task each, streamed a block at a time: BLOCK_ROWS rows
    of Parquet or Arrow IPC, or about JSONL_CHUNK bytes of whole lines."""
    ds = ray.data.from_items([{"path": f} for f in files], override_num_blocks=len(files))
    return ds.map_batches(_file_blocks, batch_size=1, batch_format="pyarrow",
                          fn_kwargs={"fs": fs, "columns": columns}, **asks)


def _file_blocks(batch, fs, columns):
    for path in batch.column("path").to_pylist():
        if is_jsonl(path):
            yield from _jsonl_blocks(fs, path, columns)
        elif path.lower().endswith(ARROW_IPC):
            yield from _ipc_blocks(fs, path, columns)
        else:
            yield from _parquet_blocks(fs, path, columns)


BLOCK_ROWS = 10_000  # rows decoded at once: a row group (or a 500 MB Arrow shard) is not held whole


def _parquet_blocks(fs, path: str, columns):
    """A Parquet file's rows in order, projected to `columns`, BLOCK_ROWS at a time (a row
    group that does not decode fails the task: jobs/data/badrows.py names it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with fs.open_input_file(path) as src:
        for batch in pq.ParquetFile(src).iter_batches(batch_size=BLOCK_ROWS, columns=columns):
            yield pa.Table.from_batches([batch])


def _jsonl_blocks(fs, path: str, columns):
    """A JSON lines file in blocks of about JSONL_CHUNK. pyarrow's JSON reader parses each block
    (Ray's read_json does the same); a block it refuses (a line that is not JSON, a column whose
    type changes) is parsed line by line, and a line that cannot be a row becomes a marker row
    (BAD_COLUMN 1, its columns null) in its place, so one bad line is one bad row for the consumer
    to skip or name (jobs/data/badrows.py), not a failed read of the file."""
    with fs.open_input_stream(path) as src:  # .gz decompressed by the file's ending
        rest = b""
        while True:
            chunk = src.read(JSONL_CHUNK)
            data = rest + chunk
            if not chunk:
                if data.strip():
                    yield _jsonl_table(data, columns)
                break
            cut = data.rfind(b"\n") + 1
            data, rest = data[:cut], data[cut:]
            if data.strip():
                yield _jsonl_table(data, columns)


def _jsonl_table(data: bytes, columns):
    import io
    import json

    import pyarrow as pa
    import pyarrow.json as pj

    try:
        table = pj.read_json(io.BytesIO(data))
        bad = [0] * table.num_rows
    except pa.ArrowException:
        rows, bad = [], []
        for line in data.splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            ok = isinstance(row, dict)
            rows.append(row if ok else {})
            bad.append(0 if ok else 1)
        table = _rows_table(rows, bad)
    if columns:
        table = table.select([c for c in columns if c in table.column_names])
        for c in columns:
            if c not in table.column_names:  # every row of the block a marker: no such column
                table = table.append_column(c, pa.nulls(table.num_rows))
    return table.append_column(BAD_COLUMN, pa.array(bad, pa.int64()))


def _rows_table(rows: list[dict], bad: list[int]):
    """Rows as a table; a value whose type differs from its column's (a number among strings)
    marks its row bad, so the rest keep their types."""
    import pyarrow as pa

    try:
        return pa.Table.from_pylist(rows)
    except (pa.ArrowException, TypeError):
        pass
    for i in {i for i, *_ in odd_types(rows)}:
        rows[i], bad[i] = {}, 1
    return pa.Table.from_pylist(rows)


def _ipc_blocks(fs, path: str, columns):
    """An Arrow IPC file's rows in order, projected to `columns`, in blocks of its record batches
    gathered to at least BLOCK_ROWS rows (datasets' save_to_disk writes batches of 1000 rows)."""
    import pyarrow as pa

    held, rows = [], 0
    for batch in ipc_batches(fs, path, columns):
        held.append(batch)
        rows += batch.num_rows
        if rows >= BLOCK_ROWS:
            yield pa.Table.from_batches(held)
            held, rows = [], 0
    if held:
        yield pa.Table.from_batches(held)


def ipc_batches(fs, path: str, columns: Optional[list[str]] = None):
    """An Arrow IPC file's record batches in order, one at a time, projected to `columns`."""
    with fs.open_input_file(path) as src:
        reader = _open_ipc(src)
        batches = reader if hasattr(reader, "read_next_batch") else (
            reader.get_batch(i) for i in range(reader.num_record_batches))  # the file format's index
        for batch in batches:
            yield batch.select(columns) if columns else batch


def read_ipc(fs, path: str, columns: Optional[list[str]] = None):
    """An Arrow IPC file as one table (in-process readers: eval splits, the bad-rows guard)."""
    with fs.open_input_file(path) as src:
        table = _open_ipc(src).read_all()
    return table.select(columns) if columns else table


def _open_ipc(src):
    """A reader of an open Arrow IPC file, in the file format or the stream format
    (`datasets.save_to_disk`)."""
    import pyarrow as pa

    try:
        return pa.ipc.open_file(src)
    except pa.ArrowInvalid:
        src.seek(0)
        return pa.ipc.open_stream(src)


def read_head(path: str, columns: Optional[list[str]] = None, limit: Optional[int] = None, role: str = "eval"):
    """The first `limit` rows of a dataset spec as one pyarrow Table, read in-process (eval and
    retain splits, EWC samples): the same files and formats read_dataset streams."""
    import pyarrow as pa
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    fs, files = list_files(path, role)
    tables, rows = [], 0
    for f in files:
        if limit is not None and rows >= limit:
            break
        if f.lower().endswith(ARROW_IPC):
            table = read_ipc(fs, f, columns)
        elif is_jsonl(f):
            with fs.open_input_stream(f) as src:  # .gz decompressed by the file's ending
                table = pj.read_json(src)
            table = table.select(columns) if columns else table
        else:
            with fs.open_input_file(f) as src:
                table = pq.read_table(src, columns=columns)
        tables.append(table)
        rows += table.num_rows
    table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    return table.slice(0, limit) if limit is not None else table
