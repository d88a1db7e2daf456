"""Open a dataset spec (file, folder, glob or pyarrow.fs URI; Parquet, Arrow IPC, JSON lines, or a
`datasets.save_to_disk` folder) as a Ray Dataset.

The same file listing the pre-flight check used, so what was checked is what is read.
"""

from __future__ import annotations

from typing import Optional

import ray.data

from launcher.datacheck import ARROW_IPC, is_jsonl, list_files


def read_dataset(path: str, columns: Optional[list[str]] = None, role: str = "train",
                 num_cpus: Optional[float] = None) -> ray.data.Dataset:
    """`num_cpus`: what each read task asks (default Ray's: one CPU)."""
    fs, files = list_files(path, role)
    asks = {"num_cpus": num_cpus} if num_cpus is not None else {}
    ipc = [f for f in files if f.lower().endswith(ARROW_IPC)]
    jsonl = [f for f in files if is_jsonl(f)]
    parquet = [f for f in files if f not in ipc and f not in jsonl]
    parts = []
    if parquet:
        parts.append(ray.data.read_parquet(parquet, filesystem=fs, columns=columns, **asks))
    if jsonl:
        # pyarrow's JSON reader (Ray's default) reads one object per line, streamed by block.
        ds = ray.data.read_json(jsonl, filesystem=fs, **asks)
        parts.append(ds.select_columns(columns) if columns else ds)
    if ipc:
        # Ray Data has no streaming Arrow IPC reader: IPC files are read whole, one block each.
        parts.append(ray.data.from_arrow([read_ipc(fs, f, columns) for f in ipc]))
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


def read_ipc(fs, path: str, columns: Optional[list[str]] = None):
    """An Arrow IPC file, in the file format or the stream format (`datasets.save_to_disk`)."""
    import pyarrow as pa

    with fs.open_input_file(path) as src:
        try:
            table = pa.ipc.open_file(src).read_all()
        except pa.ArrowInvalid:
            src.seek(0)
            table = pa.ipc.open_stream(src).read_all()
    return table.select(columns) if columns else table


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
