"""Read back a W&B offline run's `run-<id>.wandb` file: its records. The tracker asks it which
steps of a run are on disk (a resume logs the rest); the tests read what was logged.

The file is a log of protobuf `Record`s in 32 KiB blocks: a 7-byte file header (":W&B", magic,
version), then per chunk a 7-byte header (CRC-32, length, type: full, first, middle, last) and
its bytes; a block's tail shorter than a header is padding.
"""

from __future__ import annotations

import struct
from pathlib import Path

BLOCK, HEADER = 32 * 1024, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:HEADER])
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"{path} is not a W&B run file")
    out, pos, pending = [], HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0 and length == 0:  # padding to the block's end
            pos += left
            continue
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            pending = chunk
        elif kind == FIRST:
            pending = chunk
            continue
        elif kind == MIDDLE:
            pending += chunk
            continue
        else:
            pending += chunk
        record = pb.Record()
        try:
            record.ParseFromString(pending)
        except Exception:  # noqa: BLE001  (a last record cut short: its writer was killed)
            break
        out.append(record)
        pending = b""
    return out


def history(path: Path) -> list[dict]:
    """The run's logged rows: {key: value} with `_step`."""
    import json

    rows = []
    for r in records(path):
        if r.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item})
    return rows


def run_record(path: Path):
    for r in records(path):
        if r.WhichOneof("record_type") == "run":
            return r.run
    return None


def offline_runs(folder: Path) -> dict[str, list[Path]]:
    """W&B run id -> its offline run files under `folder` (a resumed run has one per attempt)."""
    found: dict[str, list[Path]] = {}
    for f in sorted(Path(folder).glob("wandb/offline-run-*/run-*.wandb")):
        found.setdefault(f.stem[len("run-"):], []).append(f)
    return found


def last_step(folder: Path, run_id: str) -> int:
    """The highest step of the run's history rows on disk under `folder`, over all its attempts'
    offline files; -1 when none."""
    steps = [-1]
    for f in offline_runs(folder).get(run_id, []):
        try:
            steps += [int(row["_step"]) for row in history(f) if "_step" in row]
        except (OSError, ValueError):
            continue
    return max(steps)
