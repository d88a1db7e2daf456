"""The run folder `storage_path/<run_id>/`: manifest.json, metrics.jsonl, events, exports.

Written by the job while it runs, so what it records survives the cluster.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from common.runfolder import MANIFEST, METRICS, PROGRESS, read_json, read_jsonl, write_json, write_jsonl
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


class RunDir:
    def __init__(self, path: str, label: str = ""):
        if "://" in path:
            raise NotImplementedError(
                f"storage {path!r}: only local or shared-filesystem paths are supported so far"
            )
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.label = label  # names this run's progress lines (a compare's variant)

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def read_manifest(self) -> dict:
        return read_json(self.manifest_path)

    def update_manifest(self, **fields: Any) -> dict:
        manifest = {**self.read_manifest(), **fields, "updated": time.time()}
        write_json(self.manifest_path, manifest)  # atomic: a reader never sees half a manifest
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

    def artifacts(self) -> dict:
        """Every file under the run folder with its size, relative paths."""
        return {
            str(f.relative_to(self.path)): f.stat().st_size
            for f in sorted(self.path.rglob("*"))
            if f.is_file() and f.name != MANIFEST
        }

    def prune_checkpoints(self) -> int:
        """Remove the training checkpoints (Ray Train's `checkpoint_*` folders, multitask's
        progress files) once the run has succeeded: the export is its result, and they hold
        the optimizer too (several times the model). Returns the bytes freed."""
        import shutil

        doomed = [p for p in self.path.rglob("checkpoint_*") if p.is_dir()]
        doomed += [p for p in self.path.rglob(PROGRESS) if p.exists()]
        freed = 0
        for path in doomed:
            files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
            freed += sum(f.stat().st_size for f in files)
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        return freed

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
