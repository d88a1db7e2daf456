"""Experiment tracking (the spec's `tracking:`): the run in MLflow and/or W&B, fed by the driver.

The driver follows the run folder's metrics files and logs each new record at its step to every
tracker of the spec (jobs/trackers.py). A record has one writer (rank 0 of its loop, or one
multitask worker), so each is logged once, from one process, whatever node wrote it: a run in
object storage is read from the store. The run's params are its spec, flattened; at its end come
its summary, its status and its artifacts (the export, the report). A curve other than the run's
own (a pipeline's stage, a multitask task, a compare's variant) is a child run.

The trackers' ids, and how many records of each file each has logged, are kept in the
manifest (`tracking`): a resume continues the same runs and logs no record twice (W&B, which
logs asynchronously, is asked instead which steps it has: jobs/trackers.py). A tracker that
fails is a warning and training goes on; the records it missed are tried again at the next poll.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Optional

from common.runfolder import curve_of
from jobs.artifacts import say
from jobs.trackers import TRACKERS, flatten


def _is_metrics(rel: str) -> bool:
    parts = rel.split("/")
    top = len(parts) == 1 or (len(parts) == 3 and parts[0] == "variants")
    return top and parts[-1].startswith("metrics") and parts[-1].endswith(".jsonl")


def _records(text: str) -> list[dict]:
    """The whole records of a metrics file being appended to (a last line not yet ended is not one)."""
    lines = text.split("\n")[:-1]
    return [json.loads(line) for line in lines if line.strip()]


def metrics_files(run_dir) -> dict[str, list[dict]]:
    """The run folder's metrics files (its own, a multitask's per task, a compare's variants'),
    relative path -> records."""
    if run_dir.remote:
        mirror = run_dir.mirror
        found = {}
        for rel, _ in mirror.remote_files():
            if _is_metrics(rel):
                with mirror.fs.open_input_stream(f"{mirror.root}/{rel}") as src:
                    found[rel] = _records(src.read().decode())
        return found
    paths = [*run_dir.path.glob("metrics*.jsonl"), *run_dir.path.glob("variants/*/metrics*.jsonl")]
    return {p.relative_to(run_dir.path).as_posix(): _records(p.read_text()) for p in sorted(paths)}


class Tracking:
    """The trackers of one attempt of a run, fed by a polling thread in the driver."""

    def __init__(self, config: dict, plan: dict, run_dir, attempt: int, every_s: float = 5.0):
        self.config, self.plan, self.run_dir, self.attempt = config, plan, run_dir, attempt
        self.every_s = every_s
        self.state = dict(run_dir.read_manifest().get("tracking") or {})
        self.trackers: list = []
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._warned: set = set()

    @classmethod
    def start(cls, spec, plan: dict, run_dir, attempt: int) -> Optional["Tracking"]:
        config = spec.tracking.model_dump(mode="json")
        if not any(config.values()):
            return None
        tracking = cls(config, plan, run_dir, attempt)
        tracking._thread = threading.Thread(target=tracking._follow, daemon=True, name="ftlaunch-tracking")
        tracking._thread.start()
        return tracking

    def _warn(self, name: str, what: str, exc: BaseException) -> None:
        first = (str(exc).splitlines() or [""])[0][:300]
        line = f"[ftlaunch] warning: {name}: {what}: {type(exc).__name__}: {first}"
        if line not in self._warned:  # once per distinct problem: a server away for a while is one line
            self._warned.add(line)
            say(line)

    def open(self) -> None:
        run = {"run_id": self.plan["run_id"], "kind": self.plan["kind"], "attempt": self.attempt,
               "spec": self.plan["spec"], "params": flatten({k: v for k, v in self.plan["spec"].items() if k != "env"})}
        for name, config in self.config.items():
            if not config:
                continue
            state = self.state.setdefault(name, {})
            try:
                tracker = TRACKERS[name](config, state, self.run_dir.path)
                tracker.open(run)
            except Exception as exc:  # noqa: BLE001  (a tracker never fails the run)
                self._warn(name, "not tracked in this attempt", exc)
                continue
            self.trackers.append(tracker)
            say(f"[ftlaunch] tracking: {name} run {state['run_id']}")
        self._save()

    def _save(self) -> None:
        self.run_dir.update_manifest(tracking=self.state)

    def poll(self) -> int:
        """Log every record not yet logged; returns how many records were new (to any tracker)."""
        if not self.trackers:
            return 0
        try:
            files = metrics_files(self.run_dir)
        except (OSError, ValueError) as exc:
            self._warn("tracking", "the metrics could not be read", exc)
            return 0
        sent = 0
        for tracker in self.trackers:
            count = 0
            logged = self.state[tracker.name].setdefault("logged", {})
            for rel, records in files.items():
                done = logged.get(rel, 0)
                if len(records) < done:  # a resume dropped the records past its checkpoint
                    done = len(records)
                new = records[done:]
                try:
                    for curve, run_records in _by_curve(rel, new):
                        tracker.log(curve, run_records)
                except Exception as exc:  # noqa: BLE001  (tried again at the next poll)
                    self._warn(tracker.name, "metrics not logged yet", exc)
                    break
                logged[rel] = len(records)
                count += len(new)
            sent = max(sent, count)
        if sent:
            self._save()
        return sent

    def _follow(self) -> None:
        self.open()
        while not self._stop.wait(self.every_s):
            self.poll()

    def end(self, status: str, summary: Optional[dict] = None) -> None:
        """The last records, the summary, the artifacts (a finished run's), the run's end."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        if self.run_dir.remote:  # this node's last records are read from the store: push them first
            try:
                self.run_dir.mirror.push()
            except OSError as exc:
                self._warn("tracking", "the last records could not be pushed", exc)
        self.poll()
        folder = self._artifacts_folder() if status == "SUCCEEDED" else None
        for tracker in self.trackers:
            try:
                tracker.close(status, summary, folder)
            except Exception as exc:  # noqa: BLE001
                self._warn(tracker.name, "the run's end was not logged", exc)
        self._save()

    def _artifacts_folder(self) -> Optional[Path]:
        """The whole finished run folder here: a run in object storage is pulled (its exports may
        have been written on another node) into the client's cache of it."""
        if not self.run_dir.remote:
            return self.run_dir.path
        from common.runstore import local_run

        try:
            self.run_dir.mirror.push()
            return local_run(self.run_dir.remote)
        except OSError as exc:
            self._warn("tracking", "no artifacts logged", exc)
            return None


def _by_curve(rel: str, records: list[dict]) -> list[tuple[str, list[dict]]]:
    """Consecutive records of one curve together, in order (a pipeline's file holds its stages')."""
    groups: list[tuple[str, list[dict]]] = []
    for record in records:
        if "step" not in record:
            continue
        curve = curve_of(rel, record)
        if groups and groups[-1][0] == curve:
            groups[-1][1].append(record)
        else:
            groups.append((curve, [record]))
    return groups


def end(tracking: Optional[Tracking], status: str, summary: Optional[dict] = None) -> None:
    if tracking is not None:
        tracking.end(status, summary)
