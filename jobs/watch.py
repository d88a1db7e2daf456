"""The job's watchdog for `pending_timeout`: a job that waits on resources too long is stopped.

Ray never gives up on a placement group or a task it cannot place: a job asking for more than
the cluster has (or will have) sits PENDING forever. The watchdog asks Ray's state API what this
job is waiting for; when something has waited longer than the spec's `pending_timeout` while the
run made no progress, it stops the driver with the reason (what waits, what the cluster has).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

QUIET_S = 15.0  # nothing pending this long: the earlier wait is over (Ray Train retries its groups)


@contextlib.contextmanager
def watch_pending(timeout: float | None, run_dir, poll: float | None = None):
    if not timeout:
        yield
        return
    import ray

    job_id = ray.get_runtime_context().get_job_id()
    poll = poll or max(0.5, min(5.0, timeout / 4))
    stop = threading.Event()

    def watch():
        since, last_seen, moved = None, None, progress(run_dir)
        while not stop.wait(poll):
            try:
                waiting = pending(job_id)
            except Exception:  # the state API is best effort: a missed poll is not a verdict
                continue
            now, now_moved = time.monotonic(), progress(run_dir)
            if now_moved != moved:  # the run moved on: what waits now is not holding it up
                since, moved = None, now_moved
            if waiting:
                since, last_seen = since or now, now
            elif last_seen is None or now - last_seen > QUIET_S:
                since = None
            if since is not None and now - since > timeout:
                give_up(run_dir, (
                    f"PendingTimeout: stopped after waiting {now - since:.0f}s for resources "
                    f"(pending_timeout {timeout:g}s): {'; '.join(waiting) or 'placement'}; the cluster has "
                    f"{_resources(ray.cluster_resources())} in all, {_resources(ray.available_resources())} free. "
                    "Lower resources, or raise pending_timeout to wait longer"))

    with _background(watch, stop, "ftlaunch-pending-watch", join=poll + 5):
        yield


_ON_GIVE_UP: list = []  # fn(status, reason): a kind's own records of the run, ended with it


@contextlib.contextmanager
def on_give_up(fn):
    """While the block runs, `fn(status, reason)` is called should give_up end the driver (a
    pipeline's running stage is recorded as ended with the run)."""
    _ON_GIVE_UP.append(fn)
    try:
        yield
    finally:
        _ON_GIVE_UP.remove(fn)


def give_up(run_dir, reason: str, status: str = "FAILED", end=None) -> None:
    """Record the reason and end the driver now.

    The main thread sits in a blocking Ray call that no signal interrupts; exiting the process
    is what ends the job: Ray then removes its actors and placement groups and reports FAILED.
    """
    from common.runfolder import ended

    run_dir.update_manifest(**ended(run_dir.read_manifest(), status, reason), artifacts=run_dir.artifacts())
    for fn in list(_ON_GIVE_UP):
        try:
            fn(status, reason)
        except Exception as exc:  # noqa: BLE001 -- the run's own record is written: say it, end anyway
            print(f"[ftlaunch] could not record the end in a kind's records: {exc}", flush=True)
    print(f"[ftlaunch] {status}: {reason}", flush=True)
    time.sleep(1.0)  # the log tee copies the line out before the process goes
    (end or (lambda: os._exit(1)))()


def pending(job_id: str) -> list[str]:
    """What this job is waiting on: placement groups and tasks Ray has not placed yet."""
    from ray.util.state import list_placement_groups, list_tasks

    found = []
    for pg in list_placement_groups(filters=[("state", "=", "PENDING")], detail=True,
                                    raise_on_missing_output=False, timeout=5):
        if pg.creator_job_id == job_id:
            bundles = [_resources(b.get("unit_resources") or b) for b in pg.bundles or []]
            found.append(f"placement group of {len(bundles)} bundle(s) {', '.join(bundles)}")
    tasks = list_tasks(filters=[("job_id", "=", job_id), ("state", "=", "PENDING_NODE_ASSIGNMENT")],
                       raise_on_missing_output=False, timeout=5)
    if tasks:
        found.append(f"{len(tasks)} task(s) ({', '.join(sorted({t.name for t in tasks})[:3])})")
    return found


def progress(run_dir) -> tuple:
    """Sizes of the run's metrics files: they grow while the job trains."""
    return tuple(sorted((p.name, p.stat().st_size) for p in run_dir.path.rglob("metrics*.jsonl")))


def _resources(res: dict) -> str:
    keep = {k: v for k, v in res.items() if k in ("CPU", "GPU") or k.startswith("accelerator")}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(keep.items())) + "}"


# ---------------------------------------------------------------------------------------------
# A driver that outlived its job


TERMINAL = ("STOPPED", "FAILED", "SUCCEEDED")


@contextlib.contextmanager
def watch_job_status(submission_id: str | None, url: str | None, run_dir, poll: float = 3.0, end=None):
    """End this driver when Ray reports its job ended while it still runs.

    A stop that reaches Ray's job supervisor while it is still starting the driver marks the job
    STOPPED, but the signal can miss the driver it just started (seen on CI: a driver ran 15
    minutes after `ftlaunch stop`, holding the CPUs later jobs waited for). Ray then tracks
    nothing, so the driver ends itself, recording what Ray said. `url`: the dashboard the job was
    submitted to (the client puts it in the job's env); without it there is nothing to ask.
    """
    if not (submission_id and url):
        yield
        return
    from ray.job_submission import JobSubmissionClient

    stop = threading.Event()

    def watch():
        client = None
        while True:
            try:
                client = client or JobSubmissionClient(url)
                status = str(client.get_job_status(submission_id)).split(".")[-1]
            except Exception:  # the dashboard is best effort: a missed poll is not a verdict
                status = None
            if stop.is_set():
                return
            if status in TERMINAL:
                final = "STOPPED" if status == "STOPPED" else "FAILED"
                give_up(run_dir, f"{'Stopped' if final == 'STOPPED' else 'Lost'}: Ray reports job {submission_id} "
                        f"{status} while its driver (pid {os.getpid()}) still ran; the driver ended itself",
                        final, end)
                return
            if stop.wait(poll):
                return

    with _background(watch, stop, "ftlaunch-job-status-watch"):
        yield


FATAL = ".fatal"  # in the run folder: the line of an error no retry gets past


class NoRetry(Exception):
    """An error a retry would meet again (a bad row of the data): the worker records it in the run
    folder and the driver ends the job with its line, rather than Ray Train starting the workers
    over (FailureConfig counts every error alike) to fail at the same row, or not, by chance."""


def record_fatal(run_path, line: str) -> None:
    from common.runfolder import write_bytes_atomic

    write_bytes_atomic(os.path.join(run_path, FATAL), line.encode())


@contextlib.contextmanager
def watch_fatal(run_dir, poll: float = 1.0, end=None):
    """End this driver with the line a worker recorded (record_fatal) during this attempt."""
    path = os.path.join(run_dir.path, FATAL)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # an earlier attempt's: the resume after the fix starts clean
    stop = threading.Event()

    def watch():
        while not stop.wait(poll):
            try:
                with open(path) as f:
                    line = f.read().strip()
            except FileNotFoundError:
                continue
            if line and not stop.is_set():
                give_up(run_dir, line, "FAILED", end)
                return

    with _background(watch, stop, "ftlaunch-fatal-watch"):
        yield


@contextlib.contextmanager
def _background(target, stop: threading.Event, name: str, join: float | None = None):
    """Run `target` in a daemon thread for the block; `stop` tells it the block is over."""
    thread = threading.Thread(target=target, daemon=True, name=name)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        if join:
            thread.join(timeout=join)
