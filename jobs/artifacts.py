"""The run folder `storage_path/<run_id>/`: manifest.json, metrics.jsonl, events, exports.

Written by the job while it runs, so what it records survives the cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

from common import runstore
from common.runfolder import MANIFEST, METRICS, PROGRESS, RESERVE, read_json, read_jsonl, write_jsonl, write_manifest
from jobs import tensorboard

PACKAGES = ("ftlaunch", "ray", "torch", "transformers", "peft", "accelerate", "pyarrow",
            "deepspeed", "bitsandbytes")


def versions() -> dict:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


_MIRRORS: dict = {}  # one Mirror per run URI per process: its record of what it pushed
_PULLED: set = set()  # the run URIs this worker process has pulled into its node's mirror
_MANIFEST_LOCK = threading.RLock()  # one read-merge-write of a manifest at a time in a process


class RunDir:
    """A run folder. `path` is a folder, or a URI in object storage (common/runstore.py): then
    `self.path` is this node's local mirror of it, `self.remote` the URI, and `sync()` pushes."""

    def __init__(self, path: str, label: str = ""):
        self.remote: str | None = None
        if runstore.is_remote(path):
            self.remote, self.path = path, runstore.mirror_path(path)
            self.root = self.path  # the run's mirror on this node
        else:
            self.path = self.root = Path(path)
            # A worker of a run in object storage is given the driver's mirror (or a folder in it:
            # a pipeline's stage, a compare's variant): it keeps its own, on its node (the same
            # folder where it is the driver's node).
            uri = os.environ.get(runstore.RUN_URI_ENV)
            sub = runstore.in_mirror(self.path, uri) if uri else None
            if sub is not None:
                self.root = runstore.mirror_path(uri)
                self.remote, self.path = runstore.join(uri, sub), self.root / sub
        self.path.mkdir(parents=True, exist_ok=True)
        self.label = label  # names this run's progress lines (a compare's variant)
        if self.remote and path != self.remote and self._stale():
            self._pull_once()  # a worker on another node than the driver's (which pulls in fresh_mirror)

    # -- object storage ------------------------------------------------------------------------

    def _with_stored(self, manifest: dict) -> dict:
        """A run in object storage has a manifest writer on each node with a worker that records
        something (rank 0's `before`). Its fields are only ever added or set, so: on the driver's
        node the store's copy fills the fields missing here; elsewhere the store's copy (the
        driver's) is newer than this node's pulled one."""
        if not self.remote:
            return manifest
        try:
            with self.mirror.fs.open_input_stream(f"{self.mirror.root}/{MANIFEST}") as src:
                stored = json.loads(src.read())
        except (OSError, ValueError):  # not written yet, or the store is away: this node's own
            return manifest
        if (self.root / runstore.DRIVER_MARK).exists():
            return {**stored, **manifest}
        return {**manifest, **stored}

    @property
    def mirror(self):
        if self.remote not in _MIRRORS:
            _MIRRORS[self.remote] = runstore.Mirror(self.remote, self.path)
        return _MIRRORS[self.remote]

    def _stale(self) -> bool:
        """A worker's mirror on a node other than the driver's is what an earlier worker group
        there pulled: a restarted or resized group (rank 0 now on this node, the node that wrote
        the records since gone) pulls the store's files once per worker process first."""
        if not self.manifest_path.exists():
            return True
        return not (self.root / runstore.DRIVER_MARK).exists() and self.remote not in _PULLED

    def _pull_once(self) -> None:
        import fcntl

        with open(self.path.parent / f".{self.path.name}.pull.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # the node's other workers wait for this one's pull
            if self._stale():
                self.mirror.pull()
                _PULLED.add(self.remote)

    def fresh_mirror(self) -> None:
        """The driver's start: this node's mirror is what the store holds (a resume continues
        from the store's files, not from a stale mirror an earlier attempt left here)."""
        if self.remote:
            self.drop_mirror()
            self.path.mkdir(parents=True, exist_ok=True)
            self.mirror.pull()

    def drop_mirror(self) -> None:
        """Remove this node's mirror of a run in object storage (after the driver's last push)."""
        import shutil

        if self.remote:
            shutil.rmtree(self.path, ignore_errors=True)
            _MIRRORS.pop(self.remote, None)

    def sync(self) -> None:
        """A worker's push to the store of what changed in its node's mirror; nothing on the
        driver's node (its pusher pushes that mirror) or for a local run folder."""
        if self.remote and not (self.root / runstore.DRIVER_MARK).exists():
            self.mirror.push()

    def start_sync(self, every_s: float = 2.0):
        """The driver's pusher (a thread; its `stop()` pushes once more), or None for a local run."""
        if not self.remote:
            return None
        (self.path / runstore.DRIVER_MARK).write_text(str(os.getpid()))
        return runstore.Pusher(self.mirror, every_s).start()

    def ray_storage(self, inside: bool = False) -> dict:
        """Ray Train's storage_path (and storage_filesystem for a store) for runs named after
        this run (`inside`: runs in the run folder, a pipeline's stages)."""
        if not self.remote:
            return {"storage_path": str(self.path if inside else self.path.parent)}
        fs, path = runstore.filesystem(self.remote)
        return {"storage_path": path.rstrip("/") if inside else path.rstrip("/").rsplit("/", 1)[0],
                "storage_filesystem": fs}

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def read_manifest(self) -> dict:
        return read_json(self.manifest_path)

    def update_manifest(self, **fields: Any) -> dict:
        with _MANIFEST_LOCK:  # the driver's threads (tracking, a stop) write it too
            manifest = {**self._with_stored(self.read_manifest()), **fields, "updated": time.time()}
            write_manifest(self.manifest_path, manifest)  # atomic: a reader never sees half a manifest
        return manifest

    def append(self, name: str, record: dict) -> None:
        with open(self.path / name, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        if name.startswith("metrics"):  # the same record as TensorBoard scalars
            tensorboard.write(self.path, name, record)

    def read_jsonl(self, name: str) -> list[dict]:
        return read_jsonl(self.path / name)

    def truncate_jsonl(self, name: str, keep) -> None:
        """Rewrite a JSONL file keeping only the records `keep` accepts (atomic)."""
        records, removed = [], []
        for r in self.read_jsonl(name):
            (records if keep(r) else removed).append(r)
        write_jsonl(self.path / name, records)
        if name.startswith("metrics") and removed:
            tensorboard.truncated(self.path, name, removed)

    def artifacts(self, leaving: tuple[Path, ...] = ()) -> dict:
        """Every file under the run folder with its size, relative paths (`leaving`: folders and
        files about to be removed, left out)."""
        return {
            str(f.relative_to(self.path)): f.stat().st_size
            for f in sorted(self.path.rglob("*"))
            if f.is_file() and f.name not in (MANIFEST, RESERVE) and not any(f == p or p in f.parents for p in leaving)
        }

    def checkpoints(self) -> tuple[list[Path], list[str], int]:
        """The training checkpoints a succeeded run no longer needs (Ray Train's `checkpoint_*`
        folders, multitask's progress files; the export is its result, and they hold the
        optimizer too, several times the model): the local ones, the store's (relative paths),
        and the bytes they hold."""
        local = [p for p in self.path.rglob("checkpoint_*") if p.is_dir()]
        local += [p for p in self.path.rglob(PROGRESS) if p.exists()]
        held = sum(f.stat().st_size for path in local
                   for f in ([path] if path.is_file() else path.rglob("*")) if f.is_file())
        remote, remote_bytes = self._remote_checkpoints() if self.remote else ([], 0)
        return local, remote, held + remote_bytes

    def prune_checkpoints(self, found: Optional[tuple[list[Path], list[str], int]] = None) -> int:
        """Remove the checkpoints `checkpoints()` found (found now if not given); returns the
        bytes freed. Run after the run's SUCCEEDED is recorded: a stop that lands mid-way leaves
        a succeeded run with some checkpoints over, never a stopped one without them."""
        import shutil

        local, remote, held = found or self.checkpoints()
        for rel in remote:
            self.mirror.delete(rel)
        for path in local:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        return held

    def _remote_checkpoints(self) -> tuple[list[str], int]:
        """Ray Train's checkpoint folders in the store (written there, never mirrored) and the
        progress files' copies there: outermost paths, and the bytes under them."""
        import pyarrow.fs as pafs

        mirror = self.mirror
        infos = mirror.fs.get_file_info(pafs.FileSelector(mirror.root, recursive=True, allow_not_found=True))
        rels = {i.path[len(mirror.root):].lstrip("/"): i for i in infos}
        doomed = sorted(rel for rel, i in rels.items() if i.type == pafs.FileType.Directory
                        and (i.base_name.startswith(runstore.CHECKPOINT_PREFIX) or i.base_name == PROGRESS))
        doomed = [d for d in doomed if not any(d.startswith(o + "/") for o in doomed)]  # outermost only
        held = sum(i.size or 0 for rel, i in rels.items() if i.type == pafs.FileType.File
                   and any(rel.startswith(d + "/") for d in doomed))
        return doomed, held

    @contextlib.contextmanager
    def progress(self, totals: int | dict[str, int], every: float = 0.5, unit: str = "tok/s"):
        """Print one progress line per new metrics record while the body runs (driver side).

        `totals`: the run's total steps, or {metrics file: its total steps} (multitask: a file per task);
        `unit`: what the records' throughput counts (rows/s for the ARR-COC pipeline's stages).
        """
        totals = {METRICS: totals} if isinstance(totals, int) else totals
        stop = threading.Event()
        seen = {name: len(self.read_jsonl(name)) for name in totals}  # earlier attempts' records: not news

        def follow():
            while True:
                for name, total in totals.items():
                    records = self.read_jsonl(name)
                    for r in records[seen[name]:]:
                        say(progress_line(r, total, self.label, unit))
                    seen[name] = len(records)
                if stop.is_set():
                    return
                stop.wait(every)

        thread = threading.Thread(target=follow, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)


def on_this_node(path: str) -> str:
    """A path inside the driver's mirror of a run in object storage (an earlier stage's export,
    an adapter a worker saved) as this node's: mapped into this node's mirror, and the files of
    it this node lacks pulled from the store (written on another node). Any other path as it is."""
    uri = os.environ.get(runstore.RUN_URI_ENV)
    sub = runstore.in_mirror(path, uri) if uri else None
    if sub is None:
        return path
    local = runstore.mirror_path(uri) / sub
    runstore.Mirror(runstore.join(uri, sub), local).pull(missing_only=True)
    return str(local)


def say(line: str) -> None:
    """One whole line in one write: a line printed while Ray echoes its workers' logs from another
    thread is never glued to one of theirs."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def progress_line(r: dict, total: int, label: str = "", unit: str = "tok/s") -> str:
    """`[ftlaunch] [variant V, stage S, task T: ]step N/TOTAL loss ... eta ...`."""
    step = r["step"]
    eta = (total - step) * r["elapsed_s"] / max(step, 1)
    names = [label] if label else []
    names += [f"{key} {r[key]}" for key in ("stage", "task") if r.get(key)]
    where = f"{', '.join(names)}: " if names else ""
    loss = f" loss {r['loss']:.4f}" if r.get("loss") is not None else ""
    evals = f" eval {r['eval_loss']:.4f}" if r.get("eval_loss") is not None else ""
    rate = f" {unit} {r['tokens_per_s']:.0f}" if r.get("tokens_per_s") is not None else ""
    return f"[ftlaunch] {where}step {step}/{total}{loss}{evals}{rate} eta {eta:.0f}s"
