"""The Ray Jobs API target, registered twice: `ray` (any cluster, by --address, then RAY_ADDRESS)
and `local` (the same code on the embedded head, started if needed), so the two cannot drift."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from common.runfolder import CLUSTER_ADDRESS_ENV, MANIFEST, latest_attempt
from common.runstore import local_run
from launcher.errors import ClusterError, PlanError, SubmissionError
from launcher.runs import reconcile, record_stop
from launcher.targets import Handle, Target, env_ref, register_target

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
CONNECT_TIMEOUT_S = 5.0
STOP_GRACE_S = 15  # Ray's default, 3 s, can SIGKILL a driver still unwinding Ray Train


def resolve_address(address: Optional[str] = None, *, embedded: bool = False, start: bool = True) -> str:
    """The cluster a verb talks to: --address; else, for the embedded target, the embedded head
    (started if asked); else RAY_ADDRESS. The address chosen is passed to Ray explicitly (see
    `client`), so Ray's own RAY_ADDRESS lookup cannot override it; a RAY_ADDRESS it overrides is
    named in a warning."""
    from cluster import local

    env = os.environ.get("RAY_ADDRESS")
    if embedded and not address:
        local.client_env()
        head = local.status()
        if head is None and start:
            head = local.up()
            sys.stderr.write(f"ftlaunch: started the embedded Ray head at {head.address} (pid {head.pid}); it "
                             "keeps running for later jobs; stop it with: ftlaunch cluster down\n")
        if head is None:
            raise ClusterError("no embedded Ray head is running; start one with: ftlaunch cluster up")
        _warn_overridden(env, head.address, "the embedded head (target local)")
        return head.address
    if address:
        url = _dashboard_url(address)
        if url is not None:
            _warn_overridden(env, url, "--address")
    address = address or env
    if not address:
        raise ClusterError("no cluster address; pass --address http://HOST:8265 or set RAY_ADDRESS")
    url = _dashboard_url(address)
    if url is None:
        raise ClusterError(
            f"address {address!r} is not a Ray dashboard URL; use http://HOST:8265 (--address or RAY_ADDRESS)"
        )
    head = local.recorded()  # no request: a host that never answers must cost only its own timeout
    if head is not None and head.address == url.rstrip("/"):  # the embedded head by its address: its token
        local.client_env()
    return url


def _warn_overridden(env: Optional[str], chosen: str, why: str) -> None:
    if env and _dashboard_url(env) not in (chosen, None) and env != chosen:
        sys.stderr.write(f"ftlaunch: warning: RAY_ADDRESS={env} is ignored: using {chosen} ({why}); "
                         "pass --target ray without --address to use RAY_ADDRESS\n")


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


def live_capacity(url: str, resources: dict, spec: Optional[dict] = None) -> tuple[list[str], dict]:
    """launcher/capacity.py on the cluster the job goes to: refuses a job no node can ever place,
    and a local storage folder on a cluster of several nodes (unless `storage_shared`). Returns
    the warnings and the driver's entrypoint resources (a driver slot where the head has them)."""
    from launcher import capacity

    try:
        cluster = capacity.read_cluster(url)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"the cluster's nodes could not be read at {url} ({type(exc).__name__}); "
                "whether it can place the job was not checked"], {}
    if spec is not None:
        capacity.check_storage(cluster, spec.get("storage", ""), bool(spec.get("storage_shared")))
    return capacity.check(cluster, resources), capacity.entrypoint_resources(cluster)


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
        # Ray's client prefers RAY_ADDRESS (and RAY_API_SERVER_ADDRESS) over the address it is
        # given: made under _as_given, the address we resolved is the one used.
        with _as_given():
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


_GIVEN = threading.local()  # set in a thread making a client: its address is used as given


@contextlib.contextmanager
def _as_given():
    """While a thread makes a JobSubmissionClient, Ray's address lookup (which lets RAY_ADDRESS
    override the address given) returns an http(s) URL as given, for that thread only. Hiding
    the variables instead changed the process's environment under other threads: one copying it
    at that moment failed with KeyError: 'RAY_ADDRESS' (found by bench/load.py)."""
    from ray.dashboard.modules.job import sdk

    lookup = sdk.get_address_for_submission_client
    if not getattr(lookup, "ftlaunch", False):
        def as_given(address):
            if getattr(_GIVEN, "on", False) and address and address.startswith(("http://", "https://")):
                return address
            return lookup(address)

        as_given.ftlaunch = True
        sdk.get_address_for_submission_client = as_given
    _GIVEN.on = True
    try:
        yield
    finally:
        _GIVEN.on = False


@dataclass
class JobHandle(Handle):
    """A job on a Ray cluster, tracked through its Jobs API."""

    submission_id: str
    address: str
    run_dir: Optional[str] = None
    existing: bool = False  # True when a resubmitted id returned the job already there
    cli_address: str = ""  # the --address the user gave, repeated in the next commands we print

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
        stopped = self._client.stop_job(self.submission_id)
        if stopped:
            record_stop(self.run_dir, self.submission_id)
        return stopped

    def wait(self, timeout: Optional[float] = None, on_logs: Optional[Callable[[str], None]] = None,
             poll: float = 0.5) -> str:
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
                self._reconcile(status)
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise SubmissionError(
                    f"job {self.submission_id} still {status} after {timeout:.0f}s; "
                    f"follow it with: ftlaunch logs -f {self.submission_id}"
                )
            time.sleep(poll)

    def _reconcile(self, status: str) -> None:
        """A job that ended without its driver recording why: say so in its manifest."""
        manifest = self.manifest()
        if manifest.get("status") == "RUNNING" and latest_attempt(manifest).get("submission_id") == self.submission_id:
            reconcile(local_run(self.run_dir, only=(MANIFEST,)), manifest, status, self.info().message or "")

    def row(self) -> dict:
        info = self.info()
        manifest = self.manifest()
        return {
            "submission_id": info.submission_id,
            "status": str(info.status.value),
            "message": info.message,
            "start_time": info.start_time,
            "end_time": info.end_time,
            "run_dir": self.run_dir,
            "run_status": manifest.get("status"),
            "error": manifest.get("error"),
        }

    def format_row(self, row: dict) -> list[str]:
        lines = [f"{row['submission_id']}  {row['status']}  {row['message'] or ''}".rstrip()]
        if row["error"]:
            lines.append(f"error: {row['error']}")
        if row["status"] in TERMINAL and row["run_status"] == "RUNNING":
            lines.append(f"run: still RUNNING in its manifest: the driver ended without recording why "
                         f"(killed?); continue it with: ftlaunch resume {self.run_dir}")
        if self.run_dir:
            lines.append(f"artifacts: {self.run_dir}")
        return lines

    def submitted_lines(self) -> list[str]:
        # One command per line: a `|` between them would run as a pipeline (and stop the job).
        return [
            f"{'already submitted' if self.existing else 'submitted'} {self.submission_id} to {self.address}",
            f"artifacts in {self.run_dir}",
            "next:",
            *self._commands("status", "logs -f", "stop"),
        ]

    def detached_lines(self) -> list[str]:
        return [f"{self.submission_id} is still running; follow it or stop it with:",
                *self._commands("logs -f", "stop")]

    def _commands(self, *verbs: str) -> list[str]:
        addr = f" --address {self.cli_address}" if self.cli_address else ""
        return [f"  ftlaunch {verb} {self.submission_id}{addr}" for verb in verbs]


class RayTarget(Target):
    def __init__(self, name: str, help: str, embedded: bool):
        self.name, self.help, self.embedded = name, help, embedded

    def base_dir(self) -> Path:
        return Path(os.getcwd())

    def check_storage(self, path: str) -> list[str]:
        if self.embedded:  # the run folder is made on this machine
            check_local_storage(path)
            return []
        return [f"storage {path} is a local path: the cluster's nodes must see it (a shared filesystem; "
                "submit refuses it for a cluster of several nodes unless storage_shared: true)"]

    def check_env_ref(self, key: str, value: str) -> None:
        ref = env_ref(key, value)
        if ref is not None and ref.kind == "secret":
            raise PlanError(f"env.{key}: {value} names a Kubernetes Secret; on target {self.name} use "
                            f"env:{key} (read from the cluster's environment)")

    def default_profile(self, gpus_per_worker: float) -> Optional[str]:
        # This machine is the cluster: a job that cannot fit it is refused, not just warned about.
        # A GPU job is checked against this machine's GPUs (none: local-cpu refuses it).
        if not self.embedded:
            return None
        if gpus_per_worker > 0:
            from cluster.local import local_gpus

            return "local-gpu" if local_gpus() else "local-cpu"
        return "local-cpu"

    def submit(self, plan, *, address: Optional[str] = None, **options) -> JobHandle:
        """Submit a JobPlan. Idempotent on its submission id: an existing job is returned."""
        url = resolve_address(address, embedded=self.embedded)
        c = client(url)
        handle = JobHandle(plan.submission_id, url, plan.run_dir, cli_address=address or "")
        digest = spec_digest(plan.spec)
        if _exists(c, plan.submission_id):
            _same_spec(c, plan.submission_id, digest)
            handle.existing = True
            return handle
        warnings, driver_resources = live_capacity(url, plan.resources, plan.spec)
        for warning in warnings:
            sys.stderr.write(f"ftlaunch: warning: {warning}\n")
        try:
            _submit_with_retry(
                c,
                entrypoint=plan.entrypoint,
                submission_id=plan.submission_id,
                runtime_env=_with_cluster_env(plan.runtime_env, url),
                entrypoint_num_cpus=plan.entrypoint_num_cpus,
                entrypoint_resources=driver_resources or None,
                metadata={
                    "ftlaunch_run_id": plan.run_id,
                    "ftlaunch_kind": plan.kind,
                    "ftlaunch_name": plan.name,
                    "ftlaunch_run_dir": plan.run_dir,
                    "ftlaunch_spec_sha256": digest,
                },
            )
        except RuntimeError as exc:
            if _exists(c, plan.submission_id):  # lost a race with an identical submit
                _same_spec(c, plan.submission_id, digest)
                handle.existing = True
                return handle
            raise SubmissionError(f"Ray refused job {plan.submission_id}: {exc}") from None
        return handle

    def attach(self, job_id: str, address: Optional[str] = None, **options) -> JobHandle:
        url = resolve_address(address, embedded=self.embedded, start=False)
        c = client(url)
        try:
            info = c.get_job_info(job_id)
        except RuntimeError:
            raise SubmissionError(f"no job {job_id!r} at {url}; list jobs with: ftlaunch list") from None
        run_dir = (info.metadata or {}).get("ftlaunch_run_dir")
        return JobHandle(job_id, url, run_dir, cli_address=address or "")

    def list(self, address: Optional[str] = None, **options) -> list[dict]:
        c = client(resolve_address(address, embedded=self.embedded, start=False))
        rows = []
        for job in c.list_jobs():
            if job.submission_id is None:  # a driver that called ray.init itself: not a submitted job
                continue
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


def _with_cluster_env(runtime_env: dict, url: str) -> dict:
    """The plan's runtime env, plus what this cluster tells the job: its address (the driver
    records it in its attempt) and a stop's grace before SIGKILL (time to record STOPPED)."""
    env_vars = {"RAY_JOB_STOP_WAIT_TIME_S": str(STOP_GRACE_S), **runtime_env.get("env_vars", {}),
                CLUSTER_ADDRESS_ENV: url}
    return {**runtime_env, "env_vars": env_vars}


def check_local_storage(path: str) -> None:
    """The run folder will be created on this machine: refuse a storage path that cannot hold one
    now, before anything is submitted (no write: the nearest existing folder is probed)."""
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        where = "is a file" if existing == path else f"is under {existing}, a file"
        raise PlanError(f"storage {path} {where}, not a folder; point storage at a folder (e.g. ./runs)")
    stat = os.statvfs(existing)
    reason = (
        "no write permission" if not os.access(existing, os.W_OK | os.X_OK)
        else "a read-only filesystem" if stat.f_flag & os.ST_RDONLY
        else "a virtual filesystem, like /proc" if stat.f_blocks == 0
        else None
    )
    if reason:
        raise PlanError(
            f"storage {path}: cannot create a run folder in {existing} ({reason}); "
            "point storage at a writable folder (e.g. ./runs)"
        )


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


def spec_digest(spec: dict) -> str:
    """The resolved spec's hash: a resubmitted id must carry the same spec."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _same_spec(c, submission_id: str, digest: str) -> None:
    """A reused submission id returns the existing job only for the same spec."""
    old = (c.get_job_info(submission_id).metadata or {}).get("ftlaunch_spec_sha256")
    if old is not None and old != digest:
        raise SubmissionError(
            f"submission id {submission_id} is already job {submission_id} with another spec (spec hash "
            f"{old}, this one {digest}); pick a new --submission-id, or resubmit the same spec to attach")


def _exists(c, submission_id: str) -> bool:
    try:
        c.get_job_info(submission_id)
        return True
    except RuntimeError:
        return False


register_target(RayTarget("local", "the embedded Ray head (default)", embedded=True))
register_target(RayTarget("ray", "any cluster by address", embedded=False))
