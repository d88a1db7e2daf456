"""Submit a JobPlan through the Ray Jobs API and track it: the same path for local and remote.

`local` starts (or reuses) the embedded head and then talks to it exactly as `ray` talks to any
cluster, so the two targets cannot drift.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

from common.runfolder import MANIFEST, find_run, read_json
from launcher.errors import ClusterError, LauncherError, SubmissionError
from launcher.jobplan import JobPlan, plan as make_plan
from launcher.spec import load_spec

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
CONNECT_TIMEOUT_S = 5.0


def resolve_address(target: str = "local", address: Optional[str] = None, start: bool = True) -> str:
    """--address, then RAY_ADDRESS, for `ray`; the embedded head (started if asked) for `local`."""
    from cluster import local

    if target == "local" and not address:
        local.client_env()
        head = local.up() if start else local.status()
        if head is None:
            raise ClusterError("no embedded Ray head is running; start one with: ftlaunch cluster up")
        return head.address
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ClusterError("no cluster address; pass --address http://HOST:8265 or set RAY_ADDRESS")
    url = _dashboard_url(address)
    if url is None:
        raise ClusterError(
            f"address {address!r} is not a Ray dashboard URL; use http://HOST:8265 (--address or RAY_ADDRESS)"
        )
    return url


def _dashboard_url(address: str) -> Optional[str]:
    """`HOST:PORT` or `http(s)://HOST[:PORT]` as a URL; None for anything else."""
    url = address if "://" in address else f"http://{address}"
    try:
        parts = urllib.parse.urlsplit(url)
        port_ok = parts.port is None or 0 < parts.port < 65536  # .port raises on a non-number
    except ValueError:
        return None
    plain = re.fullmatch(r"[A-Za-z0-9._\-]+(:\d+)?|\[[0-9a-fA-F:.]+\](:\d+)?", parts.netloc)
    ok = parts.scheme in ("http", "https") and parts.hostname and plain and port_ok
    return url if ok else None


def client(address: str):
    """A JobSubmissionClient, after probing that the cluster answers (before anything is spent)."""
    import logging

    from ray.job_submission import JobSubmissionClient

    # No per-upload INFO lines on the user's terminal.
    for name in ("ray.dashboard.modules.dashboard_sdk", "ray._private.runtime_env.packaging"):
        logging.getLogger(name).setLevel(logging.WARNING)

    try:
        # A host that drops packets would hold the connect for minutes; Ray sets no timeout.
        parts = urllib.parse.urlsplit(address)
        if parts.hostname and parts.port:
            socket.create_connection((parts.hostname, parts.port), timeout=CONNECT_TIMEOUT_S).close()
        return JobSubmissionClient(address)
    except socket.timeout:
        raise ClusterError(
            f"cannot reach a Ray cluster at {address}: no answer within {CONNECT_TIMEOUT_S:.0f} s; "
            "check the address and that the head's dashboard (Jobs API) is up"
        ) from None
    except (OSError, RuntimeError, ValueError) as exc:  # refused, no route, unknown host, HTTP errors
        raise ClusterError(
            f"cannot reach a Ray cluster at {address}: {str(exc).splitlines()[0]}; "
            "check the address and that the head's dashboard (Jobs API) is up"
        ) from None


@dataclass
class JobHandle:
    """A submitted job. Mirrors the CLI: status(), logs(), wait(), stop(), manifest()."""

    submission_id: str
    address: str
    run_dir: Optional[str] = None
    existing: bool = False  # True when a resubmitted id returned the job already there

    @property
    def _client(self):
        return client(self.address)

    def info(self):
        try:
            return self._client.get_job_info(self.submission_id)
        except RuntimeError as exc:
            raise SubmissionError(f"no job {self.submission_id!r} at {self.address}: {exc}") from None

    def status(self) -> str:
        return str(self.info().status.value)

    def logs(self) -> str:
        return self._client.get_job_logs(self.submission_id)

    def stop(self) -> bool:
        return self._client.stop_job(self.submission_id)

    def wait(self, timeout: Optional[float] = None, poll: float = 0.5,
             on_logs: Optional[Callable[[str], None]] = None) -> str:
        """Block until the job ends; stream new log text to `on_logs` while waiting."""
        deadline = None if timeout is None else time.monotonic() + timeout
        seen = 0
        c = self._client
        while True:
            status = str(c.get_job_status(self.submission_id).value)
            if on_logs:
                try:
                    text = c.get_job_logs(self.submission_id)
                except UnicodeDecodeError:  # read while a character was half written: next poll
                    text = ""
                if len(text) > seen:
                    on_logs(text[seen:])
                    seen = len(text)
            if status in TERMINAL:
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise SubmissionError(
                    f"job {self.submission_id} still {status} after {timeout:.0f}s; "
                    f"follow it with: ftlaunch logs -f {self.submission_id}"
                )
            time.sleep(poll)

    def manifest(self) -> dict:
        if not self.run_dir:
            return {}
        try:
            return read_json(Path(self.run_dir) / MANIFEST)
        except ValueError:
            return {}


def submit(
    spec: Union[str, Path, dict, JobPlan, object],
    target: str = "local",
    *,
    address: Optional[str] = None,
    submission_id: Optional[str] = None,
    overrides: tuple = (),
) -> JobHandle:
    """Submit a spec (file, dict, model) or a ready JobPlan. Idempotent on the submission id."""
    job_plan = spec if isinstance(spec, JobPlan) else make_plan(
        spec if hasattr(spec, "kind") and not isinstance(spec, dict) else load_spec(spec, overrides),
        target, submission_id=submission_id,
    )
    if job_plan.target == "k8s":
        raise SubmissionError("submit to k8s goes through 'ftlaunch submit --target k8s'")
    url = resolve_address(job_plan.target, address)
    c = client(url)
    handle = JobHandle(job_plan.submission_id, url, job_plan.run_dir)
    if _exists(c, job_plan.submission_id):
        handle.existing = True
        return handle
    try:
        _submit_with_retry(
            c,
            entrypoint=job_plan.entrypoint,
            submission_id=job_plan.submission_id,
            runtime_env=job_plan.runtime_env,
            entrypoint_num_cpus=job_plan.entrypoint_num_cpus,
            metadata={
                "ftlaunch_run_id": job_plan.run_id,
                "ftlaunch_kind": job_plan.kind,
                "ftlaunch_name": job_plan.name,
                "ftlaunch_run_dir": job_plan.run_dir,
            },
        )
    except RuntimeError as exc:
        if _exists(c, job_plan.submission_id):  # lost a race with an identical submit
            handle.existing = True
            return handle
        raise SubmissionError(f"Ray refused job {job_plan.submission_id}: {exc}") from None
    return handle


def resume(run: str, target: str = "local", *, address: Optional[str] = None,
           storage: str = "./runs") -> JobHandle:
    """Continue a stopped or failed run from its last checkpoint, under the same run id.

    `run` is a run folder, or a run id under `storage`. Finished stages, tasks and steps are
    not redone: the job reads what the run folder already holds.
    """
    from launcher.jobplan import resume_plan

    _, manifest = find_run(run, storage)
    if manifest.get("status") == "SUCCEEDED":
        raise SubmissionError(f"run {manifest['run_id']} already SUCCEEDED; nothing to resume")
    last = (manifest.get("attempts") or [{}])[-1].get("submission_id")
    if manifest.get("status") == "RUNNING" and last:
        # RUNNING in the manifest: the driver is alive, or died before it could say otherwise.
        try:
            status = attach(last, target, address).status()
        except (ClusterError, SubmissionError):
            status = None  # that cluster (or its record of the job) is gone: nothing runs it
        if status in ("PENDING", "RUNNING"):
            raise SubmissionError(f"run {manifest['run_id']} is still {status} as job {last}; "
                                  f"stop it first: ftlaunch stop {last}")
    attempt = max(1, len(manifest.get("attempts", [])))  # attempts[0] is the first submit
    return submit(resume_plan(manifest, target, attempt), address=address)


def attach(submission_id: str, target: str = "local", address: Optional[str] = None) -> JobHandle:
    """A handle on an existing job (status, logs, stop) without starting anything."""
    url = resolve_address(target, address, start=False)
    c = client(url)
    try:
        info = c.get_job_info(submission_id)
    except RuntimeError:
        raise SubmissionError(
            f"no job {submission_id!r} at {url}; list jobs with: ftlaunch list"
        ) from None
    return JobHandle(submission_id, url, (info.metadata or {}).get("ftlaunch_run_dir"))


def list_jobs(target: str = "local", address: Optional[str] = None) -> list[dict]:
    c = client(resolve_address(target, address, start=False))
    rows = []
    for job in c.list_jobs():
        meta = job.metadata or {}
        rows.append({
            "submission_id": job.submission_id,
            "status": str(job.status.value),
            "kind": meta.get("ftlaunch_kind"),
            "name": meta.get("ftlaunch_name"),
            "run_dir": meta.get("ftlaunch_run_dir"),
            "start_time": job.start_time,
            "end_time": job.end_time,
            "message": job.message,
        })
    return sorted(rows, key=lambda r: r["start_time"] or 0)


def _submit_with_retry(c, timeout: float = 60.0, **kwargs) -> None:
    """A freshly started head answers before its job agent is ready: retry that case only."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            c.submit_job(**kwargs)
            return
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def _exists(c, submission_id: str) -> bool:
    try:
        c.get_job_info(submission_id)
        return True
    except RuntimeError:
        return False


def echo(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


__all__ = ["JobHandle", "LauncherError", "attach", "find_run", "list_jobs", "resolve_address", "resume", "submit"]
