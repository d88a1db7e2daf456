"""Cluster-side entrypoint: `python -m jobs.run --spec FILE [key=value ...]` or `--plan-env VAR`.

Both ftlaunch's submit and a raw `ray job submit -- python -m jobs.run --spec FILE` land here.
It records the run in `storage_path/<run_id>/manifest.json`, validates the plan's spec back into
its model and dispatches on the spec's kind; the job modules read the typed spec.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import signal
import sys
import time
import traceback
from pathlib import Path

from common.runfolder import (
    CLUSTER_ADDRESS_ENV,
    DRIVER_STOPPED,
    NoSpaceError,
    ended,
    hold_reserve,
    is_no_space,
    no_space,
    release_reserve,
)
from common.runstore import RUN_URI_ENV, plain
from jobs.data.badrows import BadRowsError
from launcher.errors import LauncherError, PlanError
from launcher.kinds import get_kind
from launcher.spec import load_spec, validate


class Stopped(KeyboardInterrupt):
    """The job was asked to stop (Ray's job stop sends SIGTERM to the driver). A KeyboardInterrupt:
    the driver sits in a blocking `ray.get` (Ray Train's fit) whose periodic signal check ends the
    wait only for that kind; any other exception raised by the handler there is dropped, and the
    driver trained on until Ray's SIGKILL (15 s later on the embedded head)."""


_STOP_REQUESTED: list = []  # set once SIGTERM came: whatever the job raises then is the stop's
_SUCCEEDED: list = []  # set once SUCCEEDED is recorded: a stop after it (mid-prune) changes nothing


def stop_on_sigterm(run_dir) -> None:
    """SIGTERM records STOPPED at once, then unwinds the job: Ray SIGKILLs a driver that takes
    longer than its grace, and the unwinding (Ray Train's teardown) may. The exception that ends
    the job then need not be `Stopped`: Ray Train may wrap it, or fail on the teardown it began."""

    def on_sigterm(signum, frame):
        if _SUCCEEDED:  # the run's result is recorded: the rest (pruning, the report) may be cut short
            print("[ftlaunch] stop requested after the run SUCCEEDED; it stays SUCCEEDED", flush=True)
            return
        _STOP_REQUESTED.append(time.time())
        finish(run_dir, "STOPPED", error=DRIVER_STOPPED)
        raise Stopped("stopped by request (SIGTERM)")

    signal.signal(signal.SIGTERM, on_sigterm)


def failure_line(exc: BaseException) -> str:
    """The one line a failed run's manifest keeps. A full disk is named as such wherever it was
    met: a run-folder write (NoSpaceError), or Ray Train's checkpoint upload (its error, wrapped
    in Ray's, carries the OSError's text); so is a bad row a worker's stream met (BadRowsError)."""
    seen = exc
    while seen is not None:
        if isinstance(seen, (NoSpaceError, BadRowsError)):
            return str(seen)
        if is_no_space(seen):
            return no_space(seen.filename or "the run folder").strerror
        seen = seen.__cause__ or seen.__context__
    found = re.search(r"No space left on device: '([^']+)'", str(exc))
    if found:
        return no_space(found.group(1)).strerror
    found = re.search(r"(?:BadRowsError|NoSpaceError): (.+)", str(exc))  # a worker's, in Ray Train's error text
    if found and type(exc).__module__.split(".")[0] == "ray":  # not a line of ours that quotes one
        return found.group(1).strip()
    return f"{type(exc).__name__}: {exc}"


def finish(run_dir, status: str, error: str | None = None, **fields) -> None:
    """The run's and its latest attempt's end: status, finished time, error, and `fields`."""
    run_dir.update_manifest(**ended(run_dir.read_manifest(), status, error), **fields)


def _submission_id() -> str | None:
    """The Ray Jobs submission id of this driver, if it runs as a Ray job."""
    try:
        config = json.loads(os.environ["RAY_JOB_CONFIG_JSON_ENV_VAR"])
        return config.get("metadata", {}).get("job_submission_id")
    except (KeyError, ValueError):
        return None


def load_plan(args) -> dict:
    if args.plan_env:
        return json.loads(os.environ[args.plan_env])
    # A raw `ray job submit -- python -m jobs.run --spec FILE` plans here: the one place the
    # cluster side imports the planner.
    from launcher.jobplan import plan as make_plan

    spec = load_spec(args.spec, tuple(args.overrides))
    uploaded = _uploaded_working_dir()
    if uploaded is not None:
        refuse_paths_lost_in_upload(spec.model_dump(mode="json"), uploaded)
    return make_plan(spec, "ray", submission_id=_submission_id()).to_dict()


def _uploaded_working_dir() -> Path | None:
    """This driver's cwd when it is Ray's temporary copy of a `--working-dir` upload, else None."""
    try:
        config = json.loads(os.environ["RAY_JOB_CONFIG_JSON_ENV_VAR"])
    except (KeyError, ValueError):
        return None
    return Path.cwd() if (config.get("runtime_env") or {}).get("working_dir") else None


def refuse_paths_lost_in_upload(spec: dict, uploaded: Path) -> None:
    """A raw `ray job submit --working-dir .` runs in a temporary copy of that folder holding no
    git-ignored files (data/, runs/): a relative storage would be written there and deleted with
    it, a relative dataset there is not there. Refused with the absolute path to pass instead."""
    storage = spec["storage"]
    if "://" not in storage and not os.path.isabs(storage):
        raise PlanError(
            f"storage {storage} is relative: it would be written inside Ray's temporary copy of the "
            f"working dir ({uploaded}) and vanish with it; pass a folder the cluster keeps, e.g. "
            f"storage=$PWD/{storage.removeprefix('./')} after the spec"
        )
    missing: list[str] = []

    def record(value: str) -> str:
        if "://" not in value and not os.path.isabs(value) and not (uploaded / value).exists():
            missing.append(value)
        return value

    get_kind(spec["kind"]).resolve_paths(spec, record)
    if missing:
        path = missing[0]
        key, shown = _setting_of(spec, path)
        raise PlanError(
            f"{key}: {shown} is not in the working dir Ray uploaded ({uploaded}; Ray uploads no "
            f"git-ignored file, and data/ is one); pass it by absolute path, e.g. "
            f"{key}={shown[:len(shown) - len(path)]}$PWD/{path.removeprefix('./')} after the spec"
        )


def _setting_of(tree: dict, path: str, prefix: str = "") -> tuple[str, str]:
    """The dotted key whose value is `path` (or `hf:<path>`), and that value."""
    for key, value in tree.items():
        if value in (path, f"hf:{path}"):
            return f"{prefix}{key}", value
        if isinstance(value, dict):
            found = _setting_of(value, path, f"{prefix}{key}.")
            if found[0] != "a path":
                return found
    return "a path", path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.run")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--spec", help="a spec YAML file")
    source.add_argument("--plan-env", help="an environment variable holding a JobPlan as JSON")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the spec")
    args = parser.parse_args(argv)
    try:
        plan = load_plan(args)
        spec = validate(plan["spec"])  # the resolved spec plan() produced is a valid spec
    except LauncherError as exc:
        print(f"ftlaunch: error: {exc}", file=sys.stderr)
        return 2

    from jobs.artifacts import RunDir
    from jobs.logs import Tee, secret_values

    run_dir = RunDir(plan["run_dir"])
    run_dir.fresh_mirror()  # a run in object storage: this node's mirror starts as the store's copy
    pusher = run_dir.start_sync()
    attempt = len(run_dir.read_manifest().get("attempts", [])) + 1
    code = 1
    try:
        # The driver's log goes into the run folder as it is written: it outlives the cluster.
        with Tee(run_dir.path / "logs" / "driver.log", secret_values(spec.env),
                 header=f"attempt {attempt} submission {plan['submission_id']} pid {os.getpid()}"):
            code = run(plan, spec, run_dir)
    finally:
        release_reserve(run_dir.path)  # the run's record is written: its room goes back
        if pusher is not None:
            try:
                pusher.stop()  # the last push: the manifest's end, the whole driver log
                run_dir.drop_mirror()  # all of it is in the store now
            except OSError as exc:
                print(f"ftlaunch: error: the run could not be pushed to {plain(run_dir.remote)} "
                      f"({exc}); this node keeps it in {run_dir.path}", file=sys.stderr)
                code = 1
    return code


def run(plan: dict, spec, run_dir) -> int:
    from jobs.artifacts import versions
    from jobs.logs import resolve_env_refs
    from jobs.tracking import Tracking
    from jobs.tracking import end as end_tracking
    from jobs.watch import watch_fatal, watch_job_status, watch_pending

    previous = run_dir.read_manifest()
    attempts = previous.get("attempts", []) + [
        {"submission_id": plan["submission_id"], "started": time.time(), "driver_pid": os.getpid(),
         "address": os.environ.get(CLUSTER_ADDRESS_ENV)}
    ]
    run_dir.update_manifest(  # a resume is a new attempt: the run's status is this attempt's
        attempts=attempts, finished=None, error=None,
        run_id=plan["run_id"], kind=plan["kind"], name=plan["name"], status="RUNNING",
        started=previous.get("started", time.time()), spec=plan["spec"],
        plan={k: v for k, v in plan.items() if k != "spec"},
        versions=versions(),
    )
    print(f"[ftlaunch] run {plan['run_id']} ({plan['kind']}) -> {run_dir.path}", flush=True)
    if not run_dir.remote:  # the room the manifest's last writes take should the disk fill
        hold_reserve(run_dir.path)
    tracker = None
    try:
        run_dir.update_manifest(env_from_cluster=resolve_env_refs(spec.env))
        tracker = Tracking.start(spec, plan, run_dir, attempt=len(attempts))
        if run_dir.remote:  # the driver's folders in the run (a stage's) are its mirror's, as its workers' are
            os.environ[RUN_URI_ENV] = run_dir.remote
        connect({RUN_URI_ENV: run_dir.remote} if run_dir.remote else {})
        stop_on_sigterm(run_dir)  # after ray.init, which installs its own
        module = importlib.import_module(get_kind(plan["kind"]).job_module(plan["spec"]))
        with watch_pending(spec.pending_timeout, run_dir), watch_fatal(run_dir), \
                watch_job_status(plan["submission_id"], os.environ.get(CLUSTER_ADDRESS_ENV), run_dir):
            summary = module.run(spec, plan, run_dir)
    except BaseException as exc:  # the manifest records every way a run ends
        stopped = isinstance(exc, (Stopped, KeyboardInterrupt)) or bool(_STOP_REQUESTED)
        error = DRIVER_STOPPED if _STOP_REQUESTED else failure_line(exc)
        try:
            finish(run_dir, "STOPPED" if stopped else "FAILED", error=error, artifacts=run_dir.artifacts())
        except OSError as full:  # the manifest's own write can find the disk full too: the log keeps the line
            print(f"[ftlaunch] the manifest could not be written: {full}", flush=True)
        traceback.print_exc()
        print(f"[ftlaunch] {'STOPPED' if stopped else 'FAILED'}: {error}", flush=True)
        _report(plan, run_dir)
        end_tracking(tracker, "STOPPED" if stopped else "FAILED")
        return 1
    # SUCCEEDED is recorded before the checkpoints go: a stop landing while they are removed
    # leaves a succeeded run with some over, never a stopped one whose resume finds them gone.
    doomed = None if spec.keep_checkpoints else run_dir.checkpoints()
    if doomed is not None:
        summary = {**summary, "checkpoints_removed_bytes": doomed[2]}
    leaving = tuple(doomed[0]) if doomed else ()
    finish(run_dir, "SUCCEEDED", summary=summary, artifacts=run_dir.artifacts(leaving=leaving))
    _SUCCEEDED.append(time.time())
    if doomed is not None:
        run_dir.prune_checkpoints(doomed)
    print("[ftlaunch] summary " + json.dumps(summary, default=str), flush=True)
    _report(plan, run_dir, tracked=tracker is not None)
    end_tracking(tracker, "SUCCEEDED", summary)
    return 0


def connect(worker_env: dict | None = None) -> str:
    """Connect this driver to the head it runs on, by that head's address, never "auto".

    The job supervisor sets RAY_ADDRESS to its head's GCS address. The job's workers get it too
    (its runtime env): Ray's own lookups there (Ray Train's placement-group cleaner asks the state
    API with no address) would otherwise scan the machine's GCS processes, and with a second head
    on the host fail with "Found multiple active Ray instances" (or pick the last `ray start`).
    """
    import ray

    address = os.environ.get("RAY_ADDRESS", "")
    if not address or address == "auto" or "://" in address:
        raise LauncherError(
            f"RAY_ADDRESS={address or '(unset)'} is not a Ray head's GCS address (HOST:PORT); "
            "run the job through the Ray Jobs API (ftlaunch submit, or ray job submit), which sets it"
        )
    env = {"RAY_ADDRESS": address, **(worker_env or {})}  # worker_env: the run's URI in object storage
    ray.init(address=address, log_to_driver=True, runtime_env={"env_vars": env})
    return address


def _report(plan: dict, run_dir, tracked: bool = False) -> None:
    """The run's report, for kinds whose report is their result (a compare's table) and for a
    tracked run (one of its artifacts): what the client's `ftlaunch report` writes, from the
    finished run folder. A report that cannot be drawn is a warning, never the run's failure."""
    if not (tracked or get_kind(plan["kind"]).report_on_finish):
        return
    try:
        from launcher.report import write_report

        print(f"[ftlaunch] report {write_report(str(run_dir.path))[0]}", flush=True)
    except Exception as exc:  # noqa: BLE001
        print(f"[ftlaunch] warning: no report: {type(exc).__name__}: {exc}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
