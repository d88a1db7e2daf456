"""Bench B2: Ray Data ingest vs pyarrow's own reader on the same Parquet files, and the
texture transform's throughput. `python bench/b2_ingest.py [--address ADDR] [--out DIR]`.

The figure of merit is ray_rows_per_s / pyarrow_rows_per_s at steady state (the first batch
is timed separately: it carries the plan and the first read). Several Ray Data settings are
tried on the same files; each variant's rate and ratio are reported so the ones that help show.
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


def write_dataset(out_dir, rows: int = 200_000, files: int = 8, seed: int = 0) -> Path:
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


def _rate(batches, rows_of) -> dict:
    """Consume an iterator; first-batch latency, then steady-state rows/s over the rest."""
    t0 = time.perf_counter()
    it = iter(batches)
    first = next(it)
    t1 = time.perf_counter()
    rows = 0
    for b in it:
        rows += rows_of(b)
    t2 = time.perf_counter()
    total = rows + rows_of(first)
    return {
        "first_batch_s": round(t1 - t0, 4),
        "rows_per_s": round(rows / max(t2 - t1, 1e-9)),
        # steady state flatters a reader that ran ahead while the first batch was awaited
        "end_to_end_rows_per_s": round(total / max(t2 - t0, 1e-9)),
        "rows": total,
    }


def pyarrow_rate(root: Path, batch_size: int = 256) -> dict:
    import pyarrow.parquet as pq
    import torch

    def batches():
        for f in sorted(root.glob("*.parquet")):
            for rb in pq.ParquetFile(f).iter_batches(batch_size=batch_size):
                # copies, as Ray's batches are: zero-copy views would make this side ~6x faster
                ids = rb.column("input_ids").flatten().to_numpy().reshape(-1, SEQ).copy()
                label = rb.column("label").to_numpy().copy()
                yield {"input_ids": torch.from_numpy(ids), "label": torch.from_numpy(label)}

    return _rate(batches(), lambda b: len(b["label"]))


VARIANTS = {
    "baseline": ({}, {}),
    # local_shuffle_buffer_size=None is Ray's default: this run measures the noise between runs
    "baseline_again": ({}, {"local_shuffle_buffer_size": None}),
    "batch_1024": ({}, {"batch_size": 1024}),
    "prefetch_4": ({}, {"prefetch_batches": 4}),
    "override_blocks_8": ({"override_num_blocks": 8}, {}),
    "batch_1024_prefetch_4_blocks_8": ({"override_num_blocks": 8}, {"batch_size": 1024, "prefetch_batches": 4}),
    "ctx_no_order_small_blocks": ({"_ctx": {"preserve_order": False, "target_max_block_size": 16 * 2**20}}, {}),
}


def ray_rate(root: Path, read_kw: dict, iter_kw: dict) -> dict:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = {}
    for k, v in read_kw.pop("_ctx", {}).items():
        if k == "preserve_order":
            saved[k] = ctx.execution_options.preserve_order
            ctx.execution_options.preserve_order = v
        else:
            saved[k] = getattr(ctx, k)
            setattr(ctx, k, v)
    try:
        ds = ray.data.read_parquet(str(root), **read_kw)
        kw = {"batch_size": 256, **iter_kw}
        return _rate(ds.iter_torch_batches(**kw), lambda b: len(b["label"]))
    finally:
        for k, v in saved.items():
            if k == "preserve_order":
                ctx.execution_options.preserve_order = v
            else:
                setattr(ctx, k, v)


def texture_rate(images: int = 512, grid: int = 32) -> dict:
    from jobs.data.texture import texture_array
    from launcher.synthetic import vqa

    batch = vqa(images, 0).column("image").chunk(0).to_numpy_ndarray()
    texture_array(batch[:8], grid)  # warm the caches
    t = time.perf_counter()
    texture_array(batch, grid)
    return {"images_per_s": round(images / (time.perf_counter() - t)), "images": images}


def run(address: str | None, out_dir, *, rows: int = 200_000, files: int = 8, variants=None) -> dict:
    """Write the files, time pyarrow, every Ray Data variant and the texture transform.
    address=None starts a private 1-CPU local Ray (temp dir under out_dir) and shuts it down."""
    import ray

    out_dir = Path(out_dir)
    root = write_dataset(out_dir, rows, files)
    result = {"rows": rows, "files": files, "seq": SEQ, "pyarrow": {}}
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if address is None:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths are limited
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tmp, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)
    try:
        result["ray"] = {}
        ray_rate(root, {}, {})  # warm-up: worker start and imports are not what B2 measures
        for name in variants or VARIANTS:
            read_kw, iter_kw = VARIANTS[name]
            bs = iter_kw.get("batch_size", 256)
            if bs not in result["pyarrow"]:  # compare at the same batch size
                result["pyarrow"][bs] = pyarrow_rate(root, bs)
            r = ray_rate(root, dict(read_kw), dict(iter_kw))
            r["ratio"] = round(r["rows_per_s"] / result["pyarrow"][bs]["rows_per_s"], 3)
            result["ray"][name] = r
    finally:
        ray.shutdown()
    best = max(result["ray"], key=lambda n: result["ray"][n]["ratio"])
    result["best_variant"] = best
    result["ratio"] = result["ray"][best]["ratio"]
    result["baseline_ratio"] = result["ray"].get("baseline", {}).get("ratio")
    result["texture"] = texture_rate()
    return result


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # jobs/ and launcher/
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"))
    p.add_argument("--out", default="bench/work")
    p.add_argument("--rows", type=int, default=200_000)
    args = p.parse_args()
    print(json.dumps(run(args.address, args.out, rows=args.rows), indent=2))
