"""Bench B2: the jobs' ingest path (jobs/data/ingest.py: read_dataset, Ray Train's streaming
split, micro_batches) vs pyarrow's own reader on the same Parquet files, and the texture
transform's throughput. `python bench/b2_ingest.py [--address ADDR] [--out DIR]`.

The figure of merit is the default path's rows/s over pyarrow's (`ParquetFile.iter_batches` ->
zero-copy torch tensors) at steady state, for the micro-batch sizes a job uses (the worst is the
headline); the first batch is timed separately (it carries Ray Data's plan and task launch).
Beside it, for the record: the same comparison with both sides reading from memory (no read
ahead, only the iterators), and `iter_torch_batches(batch_size=micro)`, the path the jobs took
before jobs/data/ingest.py.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

SEQ = 64
MICROS = (8, 256)  # a job's micro-batch, and the batch this bench used before
ROWS = 2_000_000  # 512 MB of token ids: pyarrow alone takes a second or more
LEGACY_ROWS = 200_000  # the old path at 8 rows a batch is slow: its rate is taken on a tenth


def write_dataset(out_dir, rows: int = ROWS, files: int = 16, seed: int = 0) -> Path:
    """`rows` rows of int32 token ids (fixed_size_list<int32>[64]) plus an int64 label,
    split into `files` Parquet files under out_dir/b2."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(out_dir) / "b2"
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, part in enumerate(np.array_split(np.arange(rows), files)):
        ids = rng.integers(0, 32_000, size=(len(part), SEQ), dtype=np.int32)
        table = pa.table({
            "input_ids": pa.FixedSizeListArray.from_arrays(pa.array(ids.ravel()), SEQ),
            "label": pa.array(part, pa.int64()),
        })  # fmt: skip
        pq.write_table(table, root / f"part-{i:03d}.parquet")
    return root


def _rate(batches, rows_of, limit: int | None = None) -> dict:
    """Consume an iterator (up to `limit` rows): the first batch's latency; the steady-state
    rows/s over the second half of the rows (by then what Ray Data read ahead while the first
    batch was awaited is spent: the rate is the slower of reading and iterating); end to end."""
    t0 = time.perf_counter()
    it = iter(batches)
    rows = rows_of(next(it))
    t1 = time.perf_counter()
    marks = [(t1, rows)]
    for b in it:
        rows += rows_of(b)
        marks.append((time.perf_counter(), rows))
        if limit is not None and rows >= limit:
            break
    t2 = time.perf_counter()
    half_t, half_rows = next(m for m in marks if m[1] >= rows / 2)
    return {
        "first_batch_s": round(t1 - t0, 4),
        "rows_per_s": round((rows - half_rows) / max(t2 - half_t, 1e-9)),
        "end_to_end_rows_per_s": round(rows / max(t2 - t0, 1e-9)),
        "rows": rows,
    }


def _arrow_batches(record_batches):
    import torch

    for rb in record_batches:  # zero-copy views, as the jobs' path hands out
        ids = rb.column("input_ids").flatten().to_numpy().reshape(-1, SEQ)
        yield {"input_ids": torch.from_numpy(ids), "label": torch.from_numpy(rb.column("label").to_numpy())}


def pyarrow_rate(root: Path, batch_size: int) -> dict:
    import pyarrow.parquet as pq

    files = sorted(root.glob("*.parquet"))
    return _rate(_arrow_batches(rb for f in files for rb in pq.ParquetFile(f).iter_batches(batch_size=batch_size)),
                 lambda b: len(b["label"]))


def default_rate(dataset, micro: int) -> dict:
    """The jobs' path: Ray Train hands each worker a streaming_split shard; micro_batches reads it."""
    from jobs.data.ingest import micro_batches

    return _rate(micro_batches(dataset.streaming_split(1)[0], micro, SEQ, dtype=None), lambda b: len(b["label"]))


def legacy_rate(dataset, micro: int, limit: int) -> dict:
    shard = dataset.streaming_split(1)[0]
    return _rate(shard.iter_torch_batches(batch_size=micro, drop_last=True), lambda b: len(b["label"]), limit)


def texture_rate(images: int = 512, grid: int = 32) -> dict:
    from jobs.data.texture import texture_array
    from launcher.synthetic import vqa

    batch = vqa(images, 0).column("image").chunk(0).to_numpy_ndarray()
    texture_array(batch[:8], grid)  # warm the caches
    t = time.perf_counter()
    texture_array(batch, grid)
    return {"images_per_s": round(images / (time.perf_counter() - t)), "images": images}


def run(address: str | None, out_dir, *, rows: int = ROWS, files: int = 16) -> dict:
    """Write the files, time pyarrow and the jobs' path at each micro-batch size (from files, and
    both from memory), the old iter_torch_batches path, and the texture transform.
    address=None starts a private 2-CPU local Ray (temp dir under /tmp) and shuts it down."""
    import pyarrow.parquet as pq
    import ray

    from jobs.data.read import read_dataset

    root = write_dataset(Path(out_dir), rows, files)
    result = {"rows": rows, "files": files, "seq": SEQ, "path": "jobs.data.ingest.micro_batches", "micro": {}}
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if address is None:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths are limited
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tmp, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)
    try:
        default_rate(read_dataset(str(root)), MICROS[0])  # warm-up: worker start and imports are B1's
        in_memory = read_dataset(str(root)).materialize()
        table = pq.read_table(root)
        for micro in MICROS:
            arrow = pyarrow_rate(root, micro)
            ours = default_rate(read_dataset(str(root)), micro)
            arrow_mem = _rate(_arrow_batches(table.to_batches(max_chunksize=micro)), lambda b: len(b["label"]))
            ours_mem = default_rate(in_memory, micro)
            legacy = legacy_rate(read_dataset(str(root)), micro, LEGACY_ROWS)
            result["micro"][micro] = {
                "pyarrow": arrow, "default": ours, "legacy_iter_torch_batches": legacy,
                "ratio": round(ours["rows_per_s"] / arrow["rows_per_s"], 3),
                "end_to_end_ratio": round(ours["end_to_end_rows_per_s"] / arrow["end_to_end_rows_per_s"], 3),
                "in_memory_ratio": round(ours_mem["rows_per_s"] / arrow_mem["rows_per_s"], 3),
                "legacy_ratio": round(legacy["rows_per_s"] / arrow["rows_per_s"], 3),
            }
    finally:
        ray.shutdown()
    per = result["micro"].values()
    result["ratio"] = min(m["ratio"] for m in per)
    result["first_batch_s"] = max(m["default"]["first_batch_s"] for m in per)
    result["legacy_ratio"] = min(m["legacy_ratio"] for m in per)
    result["texture"] = texture_rate()
    return result


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # jobs/ and launcher/
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"))
    p.add_argument("--out", default="bench/work")
    p.add_argument("--rows", type=int, default=ROWS)
    args = p.parse_args()
    print(json.dumps(run(args.address, args.out, rows=args.rows), indent=2))
