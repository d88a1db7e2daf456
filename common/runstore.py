"""Run folders in object storage (`storage: s3://bucket/prefix?endpoint_override=...`).

A run in a bucket is written and read through a local mirror of it: the job's processes write
the run folder's files locally as for any run (jobs/artifacts.py RunDir) and push what changed
to `<storage>/<run_id>/` (the driver every few seconds and at the end, each worker at its
reports and its end); Ray Train's checkpoints go to the bucket directly (its storage_filesystem).
The client pulls a run's files (all but checkpoints) into a cache under FTLAUNCH_HOME and reads
them there; what it records of a run (a stop, a LOST, a report) it pushes back. Credentials come
from the environment (AWS_* on the cluster's nodes and the client's), never from the spec.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from pathlib import Path
from typing import Optional

from common.runfolder import MANIFEST

# The run folder's URI, in the environment of the job's workers (set by the driver's ray.init).
RUN_URI_ENV = "FTLAUNCH_RUN_URI"
MIRROR_ROOT_ENV = "FTLAUNCH_SCRATCH"  # where the job's processes keep their mirrors (default: /tmp)
REMOTE_MARK = ".ftlaunch-remote"  # in a mirror or cache folder: the URI it mirrors
PULL_INDEX = ".ftlaunch-pulled.json"  # in a mirror or cache folder: what each pulled file was there
DRIVER_MARK = ".ftlaunch-driver"  # in the driver node's mirror: its pusher pushes it, its workers need not
CHECKPOINT_PREFIX = "checkpoint_"  # Ray Train's, written to the bucket by Ray Train itself


def is_remote(path: Optional[str]) -> bool:
    return bool(path) and "://" in str(path) and not str(path).startswith("file://")


def plain(uri: str) -> str:
    """The URI without its ?options (endpoint, region): what lines name."""
    return uri.split("?", 1)[0]


def join(uri: str, *parts: str) -> str:
    """`s3://b/p?opts` + `x` -> `s3://b/p/x?opts`."""
    base, _, query = uri.partition("?")
    base = "/".join([base.rstrip("/"), *[p.strip("/") for p in parts if p]])
    return f"{base}?{query}" if query else base


def filesystem(uri: str):
    """(pyarrow filesystem, path inside it) of a URI."""
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(uri)


def _key(uri: str) -> str:
    return hashlib.sha256(plain(uri).encode()).hexdigest()[:16]


def mirror_path(uri: str) -> Path:
    """The job's local mirror of a run folder URI: the same path on every node."""
    root = Path(os.environ.get(MIRROR_ROOT_ENV) or Path(tempfile.gettempdir()) / "ftlaunch-scratch")
    return root / _key(uri) / plain(uri).rstrip("/").rsplit("/", 1)[-1]


def in_mirror(path, uri: str) -> Optional[str]:
    """Where `path` is inside a mirror of `uri` on some node (the driver's, passed to its workers;
    each node keeps its own, under its own FTLAUNCH_SCRATCH): "" for the mirror itself, e.g.
    "stages/sft" for a folder in it; None when it is in none."""
    parts, key, name = Path(path).parts, _key(uri), mirror_path(uri).name
    for i in range(len(parts) - 1):
        if parts[i] == key and parts[i + 1] == name:
            return "/".join(parts[i + 2:])
    return None


def cache_path(uri: str) -> Path:
    """The client's cache of a run folder URI (under FTLAUNCH_HOME)."""
    home = Path(os.environ.get("FTLAUNCH_HOME", Path.home() / ".ftlaunch"))  # cluster/local.py's home
    return home / "cache" / "runs" / _key(uri) / plain(uri).rstrip("/").rsplit("/", 1)[-1]


def remote_of(folder) -> Optional[str]:
    """The URI a mirror or cache folder mirrors, else None (a plain run folder)."""
    try:
        return (Path(folder) / REMOTE_MARK).read_text().strip() or None
    except (FileNotFoundError, NotADirectoryError):
        return None


def shown_run(folder) -> str:
    """How lines name a run folder: a cache folder by the URI it mirrors."""
    uri = remote_of(folder)
    return f"'{uri}'" if uri else str(folder)


def _skipped(rel: str) -> bool:
    parts = rel.split("/")  # a mark may be in a folder's own mirror too (a stage's, on its node)
    if parts[-1] in (REMOTE_MARK, PULL_INDEX, DRIVER_MARK) or parts[-1].endswith((".tmp", ".pull.lock")):
        return True
    return any(p.startswith(CHECKPOINT_PREFIX) for p in parts)


class Mirror:
    """A local folder and the run folder URI it mirrors. `push` uploads the files changed since
    this object's last push and removes what it pushed or pulled and is gone here; `pull`
    downloads the remote files (checkpoints aside)."""

    def __init__(self, uri: str, local: Path):
        self.uri, self.local = uri, Path(local)
        self.fs, self.root = filesystem(uri)
        self.root = self.root.rstrip("/")
        self._pushed: dict[str, tuple[int, int]] = {}
        self._lock = threading.Lock()
        self.local.mkdir(parents=True, exist_ok=True)
        mark = self.local / REMOTE_MARK
        if not mark.exists():
            mark.write_text(uri)

    def push(self) -> int:
        """Upload what changed locally, and remove from the store what this mirror pushed or
        pulled and is gone here (a temporary renamed into place, a pruned progress file);
        returns the number of files uploaded."""
        with self._lock:
            sent = 0
            for rel in [r for r in self._pushed if not (self.local / r).is_file()]:
                if self.exists(rel):
                    self.fs.delete_file(f"{self.root}/{rel}")
                del self._pushed[rel]
            for path in sorted(self.local.rglob("*")):
                rel = path.relative_to(self.local).as_posix()
                if _skipped(rel):
                    continue
                try:
                    stat = path.stat()
                    if not path.is_file():
                        continue
                    sig = (stat.st_size, stat.st_mtime_ns)
                    if self._pushed.get(rel) == sig:
                        continue
                    data = path.read_bytes()
                except FileNotFoundError:  # replaced or removed while we looked
                    continue
                self.upload(rel, data)
                self._pushed[rel] = sig
                sent += 1
            return sent

    def upload(self, rel: str, data: bytes) -> None:
        with self.fs.open_output_stream(f"{self.root}/{rel}") as out:
            out.write(data)

    def remote_files(self) -> list[tuple[str, tuple[int, int]]]:
        """(relative path, (size, mtime ns)) of the run folder's remote files, checkpoints aside."""
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self.root, recursive=True, allow_not_found=True))
        files = []
        for info in infos:
            if info.type != pafs.FileType.File:
                continue
            rel = info.path[len(self.root):].lstrip("/")
            if not _skipped(rel):
                files.append((rel, (info.size or 0, info.mtime_ns or 0)))
        return files

    def exists(self, rel: str) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(f"{self.root}/{rel}").type == pafs.FileType.File

    def pull(self, only: Optional[tuple[str, ...]] = None, missing_only: bool = False) -> int:
        """Download the remote files (those under `only`'s prefixes, if given) that are missing
        here or changed there since this folder's last pull (its index: remote size and time);
        `missing_only`: only those missing here (the driver's mirror, whose own files may be
        newer than the store's copies). Returns the number downloaded."""
        import json

        index_path = self.local / PULL_INDEX
        try:
            index = json.loads(index_path.read_text())
        except (FileNotFoundError, ValueError):
            index = {}
        got = 0
        for rel, sig in self.remote_files():
            if only is not None and not rel.startswith(only):
                continue
            target = self.local / rel
            if target.is_file() and (missing_only or index.get(rel) == list(sig)):
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with self.fs.open_input_stream(f"{self.root}/{rel}") as src:
                data = src.read()
            tmp = target.with_name(f".{target.name}.{os.getpid()}.pull.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)
            stat = target.stat()
            self._pushed[rel] = (stat.st_size, stat.st_mtime_ns)  # as the remote has it: nothing to push
            index[rel] = list(sig)
            got += 1
        if got:
            tmp = index_path.with_name(f"{PULL_INDEX}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(index))
            os.replace(tmp, index_path)
        return got

    def delete(self, rel: str) -> int:
        """Remove a remote file or folder under the run; returns the bytes it held."""
        import pyarrow.fs as pafs

        path = f"{self.root}/{rel}"
        info = self.fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            self.fs.delete_file(path)
            return info.size or 0
        if info.type != pafs.FileType.Directory:
            return 0
        held = sum(i.size or 0 for i in self.fs.get_file_info(pafs.FileSelector(path, recursive=True))
                   if i.type == pafs.FileType.File)
        self.fs.delete_dir(path)
        return held




class Pusher:
    """Push a mirror every `every_s` seconds from a thread, and once more at `stop`."""

    def __init__(self, mirror: Mirror, every_s: float = 2.0):
        self.mirror, self.every_s = mirror, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="ftlaunch-push")

    def start(self) -> "Pusher":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.mirror.push()
            except OSError as exc:  # the store is slow or away: the next push retries
                print(f"[ftlaunch] warning: could not push the run to {plain(self.mirror.uri)}: {exc}", flush=True)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.mirror.push()


def local_run(run_dir, only: Optional[tuple[str, ...]] = None) -> Path:
    """A run folder as a local path: itself; or, for a URI, the client's cache of it, pulled now
    (`only`: just those files, e.g. the manifest)."""
    if not is_remote(str(run_dir)):
        return Path(run_dir)
    local = cache_path(str(run_dir))
    Mirror(str(run_dir), local).pull(only)
    return local


def push_back(folder, *rels: str) -> None:
    """A cache folder's files the client wrote (a stop, a LOST, a report) back to the store."""
    uri = remote_of(folder)
    if uri is None:
        return
    mirror = Mirror(uri, Path(folder))
    for rel in rels:
        path = Path(folder) / rel
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for f in files:
            mirror.upload(f.relative_to(folder).as_posix(), f.read_bytes())


def list_remote_runs(storage: str) -> list[tuple[Path, dict]]:
    """Every run under a storage URI, each as (its cache folder, its manifest), manifests pulled."""
    import json

    import pyarrow.fs as pafs

    fs, root = filesystem(storage)
    root = root.rstrip("/")
    runs = []
    for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        if info.type != pafs.FileType.Directory:
            continue
        uri = join(storage, info.base_name)
        folder = local_run(uri, only=(MANIFEST,))
        try:
            runs.append((folder, json.loads((folder / MANIFEST).read_text())))
        except (OSError, ValueError):  # not a run's folder, or one being written
            continue
    return runs
