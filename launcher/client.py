"""The public job verbs: submit, attach, list, resume. Each picks its target from the registry
(launcher/targets) and hands over; the targets hold the Ray Jobs API and Kubernetes code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from common.runfolder import find_run
from launcher.errors import ClusterError, LauncherError, SubmissionError
from launcher.jobplan import JobPlan
from launcher.jobplan import plan as make_plan
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
           storage: str = "./runs", **options) -> Handle:
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
            status = attach(last, target, address, **options).status()
        except (ClusterError, SubmissionError):
            status = None  # that cluster (or its record of the job) is gone: nothing runs it
        if status in ("PENDING", "RUNNING"):
            raise SubmissionError(f"run {manifest['run_id']} is still {status} as job {last}; "
                                  f"stop it first: ftlaunch stop {last}")
    attempt = max(1, len(manifest.get("attempts", [])))  # attempts[0] is the first submit
    return submit(resume_plan(manifest, target, attempt), address=address, **options)


def attach(submission_id: str, target: str = "local", address: Optional[str] = None, **options) -> Handle:
    """A handle on an existing job (status, logs, stop) without starting anything."""
    return get_target(target).attach(submission_id, address, **options)


def list_jobs(target: str = "local", address: Optional[str] = None, **options) -> list[dict]:
    return get_target(target).list(address, **options)


__all__ = ["Handle", "JobHandle", "LauncherError", "attach", "find_run", "list_jobs", "resume", "submit"]
