"""The run-folder contract, `<storage>/<run_id>/`: its file names, the manifest's fields, and the
small file helpers both sides use to read and write it (atomic JSON, JSONL, sizes).

The job writes the folder (jobs/artifacts.py RunDir); the client reads it (status, report,
resume, adapters, infer). Neither side spells a file name of its own.
"""

from __future__ import annotations

import json
import os
import threading
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
RESERVE = ".ftl-reserve"  # space held while a run is live, spent on its manifest when the disk is full
RESERVE_BYTES = 1 << 20
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


def curve_of(rel: str, record: dict) -> str:
    """The curve a metrics record of the run folder's file `rel` belongs to: a compare's variant
    (`variants/<v>/metrics.jsonl`), a multitask task (`metrics-<task>.jsonl`), a pipeline's stage
    (its record's `stage`); "" for a run's one curve (a finetune's)."""
    parts = rel.split("/")
    if len(parts) == 3 and parts[0] == "variants":
        return parts[1]
    if parts[-1].startswith("metrics-"):
        return parts[-1][len("metrics-"):].removesuffix(".jsonl")
    return str(record.get("stage") or "")


class NoSpaceError(OSError):
    """A run-folder write that found its file system full: one line, with what it needed."""

    def __str__(self) -> str:
        return str(self.strerror)


def no_space(path: PathLike, needed: Optional[int] = None) -> NoSpaceError:
    """The one line of a full disk: the path, the bytes the write needed (when known), what is free."""
    import errno
    import shutil

    try:
        free = f"{shutil.disk_usage(Path(path).parent).free} bytes free"
    except OSError:
        free = None
    said = ", ".join(x for x in (f"{needed} bytes needed" if needed is not None else None, free) if x)
    return NoSpaceError(errno.ENOSPC, f"no space left on {path}" + (f": {said}" if said else "")
                        + "; free space there (or point storage: elsewhere) and run `ftlaunch resume RUN`")


def is_no_space(exc: BaseException) -> bool:
    """Whether `exc` is a write that found the disk (or the quota) full."""
    import errno

    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def write_bytes_atomic(path: PathLike, data: bytes) -> None:
    """Write a file atomically and durably: a temporary beside it, fsync, rename over it, fsync
    the folder. A reader never sees half a file; a failed write (a full disk) leaves the old one
    and no temporary, and raises NoSpaceError naming the file and the bytes it needed."""
    path = Path(path)
    # A temporary of this writer's own: the client and the job write one manifest at once (a stop
    # recorded by both), and a shared temporary interleaves their bytes into a file that is no JSON.
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            _write(f, data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if is_no_space(exc):
            raise no_space(path, len(data)) from None
        raise
    _fsync_folder(path.parent)


def _write(f, data: bytes) -> None:
    """The one write call of the run folder's files (tests inject a full disk here)."""
    f.write(data)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a folder: the rename is still atomic
        pass
    finally:
        os.close(fd)


def write_json(path: PathLike, data: Any, indent: int = 1) -> None:
    """Write JSON atomically (write_bytes_atomic)."""
    write_bytes_atomic(path, json.dumps(data, indent=indent, default=str, sort_keys=False).encode())


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
    write_bytes_atomic(path, "".join(json.dumps(r) + "\n" for r in records).encode())


def copy_tree_atomic(src: PathLike, dst: PathLike) -> None:
    """Copy a folder (an export: adapter/, model/, base/) so that `dst` is either the old folder or
    the whole new one: copied beside it, then renamed into place. A copy that fills the disk removes
    its partial copy, leaves `dst` as it was and raises NoSpaceError with the bytes it needed."""
    import shutil

    src, dst = Path(src), Path(dst)
    partial, old = dst.with_name(f".{dst.name}.partial"), dst.with_name(f".{dst.name}.old")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        shutil.copytree(src, partial, copy_function=_copy_file)
    except (OSError, shutil.Error) as exc:
        shutil.rmtree(partial, ignore_errors=True)
        reasons = _copy_errors(exc) if isinstance(exc, shutil.Error) else [exc]
        if any(is_no_space(e) for e in reasons):
            raise no_space(dst, dir_size(src)) from None
        raise
    if dst.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(partial, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(partial, dst)
    _fsync_folder(dst.parent)


def _copy_file(src: str, dst: str) -> str:
    """The one file copy of copy_tree_atomic (tests inject a full disk here)."""
    import shutil

    return shutil.copy2(src, dst)


def _copy_errors(exc) -> list[OSError]:
    """The OSErrors inside shutil.Error's (src, dst, why) list; why is a string there."""
    import errno

    out = []
    for item in exc.args[0] if exc.args and isinstance(exc.args[0], list) else []:
        why = str(item[-1])
        if "No space left" in why or "[Errno 28]" in why:
            out.append(OSError(errno.ENOSPC, why))
    return out


def dir_size(path: PathLike) -> int:
    """Bytes of every file under a folder (0 for a folder that is not there)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def update_manifest(folder: PathLike, **fields: Any) -> dict:
    """Merge `fields` into a run's manifest (atomically) and return it: the client's records of a
    run (a stop it asked for, what the cluster says of a job) go in the same file the job writes
    (for a run in object storage, the cache's copy, pushed back)."""
    from common.runstore import push_back

    path = Path(folder) / MANIFEST
    manifest = {**read_json(path), **fields, "updated": time.time()}
    write_manifest(path, manifest)
    push_back(folder, MANIFEST)
    return manifest


def write_manifest(path: PathLike, manifest: dict) -> None:
    """Write a run's manifest atomically; on a full disk the run's reserve (beside it) gives it
    the room to record what happened."""
    try:
        write_json(path, manifest)
    except NoSpaceError:
        if not release_reserve(Path(path).parent):
            raise
        write_json(path, manifest)


def hold_reserve(folder: PathLike) -> None:
    """Hold RESERVE_BYTES in a live run's folder (on a local disk), for its manifest's last
    writes should the disk fill: best effort, none where there is no room already."""
    path = Path(folder) / RESERVE
    try:
        if not path.exists() or path.stat().st_size < RESERVE_BYTES:
            with open(path, "wb") as f:
                f.write(bytes(RESERVE_BYTES))  # written, not sparse: the blocks are allocated
    except OSError:
        path.unlink(missing_ok=True)


def release_reserve(folder: PathLike) -> bool:
    """Give the reserve's space back; whether there was one."""
    try:
        (Path(folder) / RESERVE).unlink()
    except FileNotFoundError:
        return False
    return True


def run_path(run: PathLike, storage: PathLike = "./runs") -> Path:
    """`run` as a run folder: the folder itself when it exists or is written as a path
    (`runs/x`, `./x`), else a run id under `storage`. A run in object storage (a URI, or a run
    id under a storage URI) is its local cache, pulled now (common/runstore.py)."""
    from common.runstore import is_remote, join, local_run

    if is_remote(str(run)):
        return local_run(str(run))
    path = Path(run)
    if path.is_dir() or len(path.parts) > 1 or str(run).startswith("."):
        return path
    return local_run(join(str(storage), str(run))) if is_remote(str(storage)) else Path(storage) / str(run)


def run_folders(storage: PathLike = "./runs") -> list[tuple[Path, dict]]:
    """Every run folder under `storage` with its manifest, oldest first."""
    from common.runstore import is_remote, list_remote_runs

    if is_remote(str(storage)):
        return sorted(list_remote_runs(str(storage)), key=lambda r: r[1].get("started") or 0)
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


DRIVER_STOPPED = "Stopped: stopped by request (SIGTERM)"  # the driver's record of a SIGTERM (jobs/run.py)


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
