"""Open a dataset spec (file, folder, glob or pyarrow.fs URI; Parquet or Arrow IPC) as a Ray Dataset.

The same file listing the pre-flight check used, so what was checked is what is read.
"""

from __future__ import annotations

from typing import Optional

import ray.data

from launcher.datacheck import ARROW_IPC, list_files


def read_dataset(path: str, columns: Optional[list[str]] = None, role: str = "train") -> ray.data.Dataset:
    fs, files = list_files(path, role)
    parquet = [f for f in files if not f.lower().endswith(ARROW_IPC)]
    ipc = [f for f in files if f.lower().endswith(ARROW_IPC)]
    parts = []
    if parquet:
        parts.append(ray.data.read_parquet(parquet, filesystem=fs, columns=columns))
    if ipc:
        # Ray Data has no streaming Arrow IPC reader: IPC files are read whole, one block each.
        import pyarrow as pa

        def table(f):
            with fs.open_input_file(f) as src:
                t = pa.ipc.open_file(src).read_all()
            return t.select(columns) if columns else t

        parts.append(ray.data.from_arrow([table(f) for f in ipc]))
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])
