"""The public job verbs: submit, attach, list, resume. Each picks its target from the registry
(launcher/targets) and hands over; the targets hold the Ray Jobs API and Kubernetes code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from common.runfolder import MANIFEST, find_run, latest_attempt, read_json, run_folders
from common.runstore import local_run
from launcher.errors import ClusterError, LauncherError, SubmissionError
from launcher.jobplan import JobPlan
from launcher.jobplan import plan as make_plan
from launcher.runs import GONE, LIVE, UNKNOWN, job_row, reconcile, run_row
from launcher.spec import load_spec
from launcher.targets import Handle, get_target
from launcher.targets.ray import JobHandle


def submit(
    spec: Union[str, Path, dict, JobPlan, object],
    target: str = "local",
    *,
    address: Optional[str] = None,
    submission_id: Optional[str] = None,
    overrides: tuple = (),
    profile: Optional[str] = None,
    **options,
) -> Handle:
    """Submit a spec (file, dict, model) or a ready JobPlan (whose own target wins).

    Idempotent on the submission id. `profile` is checked at plan time (and, on k8s, sizes the
    RayJob); `options` go to the target (k8s: image, namespace, kubeconfig, out_dir).
    """
    job_plan = spec if isinstance(spec, JobPlan) else make_plan(
        spec if hasattr(spec, "kind") and not isinstance(spec, dict) else load_spec(spec, overrides),
        target, submission_id=submission_id, profile=profile,
    )
    return get_target(job_plan.target).submit(job_plan, address=address, profile=profile, **options)


def resume(run: str, target: str = "local", *, address: Optional[str] = None,
           storage: str = "./runs", overrides: tuple = (), **options) -> Handle:
    """Continue a stopped or failed run from its last checkpoint, under the same run id.

    `run` is a run folder, or a run id under `storage`. Finished stages, tasks and steps are
    not redone: the job reads what the run folder already holds. `overrides` (`key=value`) may
    change what a resume can (jobplan.RESUMABLE: e.g. train.max_steps), refused before submitting.
    """
    from launcher.jobplan import resume_plan

    _, manifest = find_run(run, storage)
    if manifest.get("status") == "SUCCEEDED":
        raise SubmissionError(f"run {manifest['run_id']} already SUCCEEDED; nothing to resume")
    attempt = max(1, len(manifest.get("attempts", [])))  # attempts[0] is the first submit
    job_plan = resume_plan(manifest, target, attempt, tuple(overrides))  # a bad override: before anything
    last = latest_attempt(manifest).get("submission_id")
    if manifest.get("status") == "RUNNING" and last:
        # RUNNING in the manifest: the driver is alive, or died before it could say otherwise.
        try:
            status = attach(last, target, address, **options).status()
        except (ClusterError, SubmissionError):
            status = None  # that cluster (or its record of the job) is gone: nothing runs it
        if status in ("PENDING", "RUNNING"):
            raise SubmissionError(f"run {manifest['run_id']} is still {status} as job {last}; "
                                  f"stop it first: ftlaunch stop {last}")
    return submit(job_plan, address=address, **options)


def attach(submission_id: str, target: str = "local", address: Optional[str] = None, **options) -> Handle:
    """A handle on an existing job (status, logs, stop) without starting anything."""
    return get_target(target).attach(submission_id, address, **options)


def list_jobs(target: str = "local", address: Optional[str] = None, **options) -> list[dict]:
    """The cluster's jobs (the target's view); `list_runs` is the run folders' view."""
    return get_target(target).list(address, **options)


def run_status(run: str, target: str = "local", address: Optional[str] = None,
               storage: str = "./runs", **options) -> Optional[dict]:
    """A run's row (runs.run_row) from its folder, reconciled with its cluster when that answers.

    `run` is a run folder, a run id or a submission id under `storage`, else a job of the target
    whose folder is read where its metadata says. None: the job's folder is not on this machine.
    """
    try:
        folder, manifest = find_run(run, storage)
    except SubmissionError:
        try:
            handle = attach(str(run), target, address, **options)
        except (ClusterError, SubmissionError) as exc:
            raise type(exc)(f"no run {run} under {storage} (a run id, run folder or submission id), "
                            f"and {exc}") from None
        manifest = handle.manifest()
        if not manifest:
            return None
        folder = local_run(handle.run_dir)
    return run_row(folder, _reconciled(folder, manifest, address, {}))


def list_runs(target: str = "local", address: Optional[str] = None, storage: str = "./runs",
              **options) -> tuple[list[dict], Optional[str]]:
    """One row per run, oldest first: every run folder under `storage`, and every job of the
    target's cluster (its folder read where this machine sees it), reconciled with the cluster.
    Works with no cluster: the second value then says why the folders are shown as recorded
    (with no folders either, that ClusterError is raised)."""
    folders = dict((str(f.resolve()), (f, m)) for f, m in run_folders(storage))
    try:
        jobs, note = get_target(target).list(address, **options), None
    except ClusterError as exc:
        if not folders:
            raise
        jobs, note = [], f"{exc}; showing the run folders under {storage} as last recorded"
    others = {}
    for job in jobs:
        folder = local_run(job["run_dir"], only=(MANIFEST,)) if job.get("run_dir") else None
        key = str(folder.resolve()) if folder else job["submission_id"]
        if key in folders:
            continue
        manifest = read_json(folder / MANIFEST) if folder else {}
        if manifest:
            folders[key] = (folder, manifest)
        else:  # a folder on the cluster's storage: the job's own row (a resume's job replaces it)
            others[key] = job_row(job)
    cache: dict = {}
    rows = [run_row(f, _reconciled(f, m, address, cache)) for f, m in folders.values()]
    rows += others.values()
    return sorted(rows, key=lambda r: r["started"] or 0), note


def _reconciled(folder: Path, manifest: dict, address: Optional[str], cache: dict) -> dict:
    """`manifest`, corrected by what the cluster of its latest attempt says of that job (the
    attempt records its Ray dashboard; --address stands in for an attempt that has none)."""
    attempt = latest_attempt(manifest)
    where, job = attempt.get("address") or address, attempt.get("submission_id")
    if manifest.get("status") != "RUNNING" or not where or not job:
        return manifest
    if where not in cache:
        try:  # the Ray Jobs API at that address: what the `ray` target talks to
            cache[where] = {j["submission_id"]: j for j in get_target("ray").list(where)}
        except ClusterError:
            # Nothing listening on loopback is a verdict (that head is gone: `cluster down`, the
            # machine restarted); a remote head that does not answer may be a network's fault.
            cache[where] = GONE if _refused_on_loopback(where) else None
    if cache[where] is None:
        return manifest
    if cache[where] == GONE:
        return reconcile(folder, manifest, GONE)
    found = cache[where].get(job)
    return reconcile(folder, manifest, found["status"] if found else UNKNOWN,
                     (found or {}).get("message") or "")


def embedded_head_down() -> tuple[bool, list[dict]]:
    """`ftlaunch cluster down`: stop the embedded head; the runs it was running are marked LOST
    (their checkpoints stay in their folders: `ftlaunch resume` continues them on any head).
    Returns whether a head was running and the manifests of the runs marked."""
    from cluster import local
    from launcher.runs import mark_lost

    head, live = local.recorded(), []
    if head is not None:
        try:
            live = [j for j in get_target("ray").list(head.address) if j["status"] in LIVE and j.get("run_dir")]
        except ClusterError:
            live = []  # a head that no longer answers runs nothing this could mark
    stopped = local.down()
    why = f"its Ray head {head.address if head else ''} was stopped (ftlaunch cluster down)"
    lost = [m for j in live if (m := mark_lost(local_run(j["run_dir"], only=(MANIFEST,)), j["submission_id"], why))]
    return stopped, lost


def _refused_on_loopback(url: str) -> bool:
    """Whether `url` is a loopback address whose port refuses connections (no process there)."""
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(url if "://" in url else f"http://{url}")
    if parsed.hostname not in ("127.0.0.1", "localhost", "::1") or not parsed.port:
        return False
    try:
        socket.create_connection((parsed.hostname, parsed.port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    return False


__all__ = ["Handle", "JobHandle", "LauncherError", "attach", "embedded_head_down", "find_run", "list_jobs",
           "list_runs", "resume", "run_status", "submit"]
