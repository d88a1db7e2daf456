"""The run-folder contract, `<storage>/<run_id>/`: its file names, the manifest's fields, and the
small file helpers both sides use to read and write it (atomic JSON, JSONL, sizes).

The job writes the folder (jobs/artifacts.py RunDir); the client reads it (status, report,
resume, adapters, infer). Neither side spells a file name of its own.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Union

MANIFEST = "manifest.json"
METRICS = "metrics.jsonl"  # one record per report: step, loss, eval_*, lr, tokens, tokens_per_s
EVENTS = "events.jsonl"
REGISTRY = "registry.json"  # multitask: the adapter registry
JOINT_EXPORT = "joint"  # multitask mode joint: backbone/, heads/<task>.safetensors, heads.json
PIPELINE = "pipeline.json"  # pipeline: one entry per stage
VARIANTS = "variants.jsonl"  # compare: one record per finished variant
LOGS, TENSORBOARD, REPORT = "logs", "tensorboard", "report"
PROGRESS = ".progress"  # multitask: per-worker progress checkpoints
# Manifest fields: run_id, kind, name, status, started, finished, error, spec, plan, versions,
# attempts [{submission_id, started, driver_pid, address, status, finished, error}], summary,
# artifacts, before, tasks.
STATUSES = ("RUNNING", "SUCCEEDED", "FAILED", "STOPPED")
# The dashboard a job was submitted to (the Ray Jobs target sets it in the job's environment); the
# driver records it in its attempt, so `ftlaunch status` asks that cluster about the job.
CLUSTER_ADDRESS_ENV = "FTLAUNCH_CLUSTER_ADDRESS"

PathLike = Union[str, Path]


def metrics_file(curve: str = "") -> str:
    """`metrics.jsonl`, or `metrics-<curve>.jsonl` for one task of a multitask run."""
    return f"metrics-{curve}.jsonl" if curve else METRICS


def write_json(path: PathLike, data: Any, indent: int = 1) -> None:
    """Write JSON atomically: a reader never sees half a file, a failed write leaves the old one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=indent, default=str, sort_keys=False))
    os.replace(tmp, path)


def read_json(path: PathLike, default: Any = None) -> Any:
    """The JSON in a file; `default` when the file is missing (a half-written file cannot exist)."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {} if default is None else default


def read_jsonl(path: PathLike) -> list[dict]:
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines if line.strip()]


def write_jsonl(path: PathLike, records: Iterable[dict]) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)


def dir_size(path: PathLike) -> int:
    """Bytes of every file under a folder (0 for a folder that is not there)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def update_manifest(folder: PathLike, **fields: Any) -> dict:
    """Merge `fields` into a run's manifest (atomically) and return it: the client's records of a
    run (a stop it asked for, what the cluster says of a job) go in the same file the job writes."""
    path = Path(folder) / MANIFEST
    manifest = {**read_json(path), **fields, "updated": time.time()}
    write_json(path, manifest)
    return manifest


def run_path(run: PathLike, storage: PathLike = "./runs") -> Path:
    """`run` as a run folder: the folder itself when it exists or is written as a path
    (`runs/x`, `./x`), else a run id under `storage`."""
    path = Path(run)
    return path if path.is_dir() or len(path.parts) > 1 or str(run).startswith(".") else Path(storage) / str(run)


def run_folders(storage: PathLike = "./runs") -> list[tuple[Path, dict]]:
    """Every run folder under `storage` with its manifest, oldest first."""
    runs = []
    for path in sorted(Path(storage).glob(f"*/{MANIFEST}")):
        try:
            runs.append((path.parent, json.loads(path.read_text())))
        except (OSError, ValueError):  # a folder being removed, or not a run's
            continue
    return sorted(runs, key=lambda r: r[1].get("started") or 0)


def latest_attempt(manifest: dict) -> dict:
    """The run's last attempt (its first submit, or its latest resume); {} before any."""
    return (manifest.get("attempts") or [{}])[-1]


def ended(manifest: dict, status: str, error: Optional[str] = None, when: Optional[float] = None) -> dict:
    """The manifest fields that end a run's latest attempt: the run's status is that attempt's."""
    when = time.time() if when is None else when
    attempts = [dict(a) for a in manifest.get("attempts") or [{}]]
    attempts[-1].update(status=status, finished=when, error=error)
    return {"status": status, "finished": when, "error": error, "attempts": attempts}


def find_run(run: PathLike, storage: PathLike = "./runs") -> tuple[Path, dict]:
    """A run folder and its manifest: `run` is the folder, a run id under `storage`, or the
    submission id of one of its attempts."""
    from common.errors import SubmissionError

    folder = run_path(run, storage)
    try:
        return folder, json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        pass
    for other, manifest in run_folders(storage):
        if any(a.get("submission_id") == str(run) for a in manifest.get("attempts") or []):
            return other, manifest
    raise SubmissionError(f"no run at {folder} (no {MANIFEST}); pass the run folder, a run id "
                          f"or a submission id under --storage (now {storage})")


def median_throughput(metrics: list[dict]) -> Optional[float]:
    """A run's throughput, one definition for every table: the median of its report windows'
    `tokens_per_s` (each window is training alone, between reports; the first also holds the
    start-up, which the median discounts). None when nothing was measured."""
    rates = sorted(m["tokens_per_s"] for m in metrics if m.get("tokens_per_s") is not None)
    return rates[len(rates) // 2] if rates else None
