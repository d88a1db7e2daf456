"""`ftlaunch stop RUN`: ask the cluster to stop a job (on k8s: delete its RayJob). RUN is a
submission id, or a run id or folder under --storage (its latest attempt's job is stopped)."""

from common.errors import SubmissionError
from common.runfolder import find_run, latest_attempt
from launcher.cli.common import add_k8s_args, add_storage_arg, add_target_args, target_of, target_options
from launcher.client import attach


def add_parser(sub) -> None:
    p = sub.add_parser("stop", help="stop a running job")
    p.add_argument("submission_id", metavar="RUN", help="a submission id, run id or run folder")
    add_target_args(p)
    add_storage_arg(p)
    add_k8s_args(p)
    p.add_argument("--wait", action="store_true", help="wait until it has stopped")
    p.set_defaults(func=run)


def job_of(ref: str, storage: str) -> str:
    """The submission id `ref` names: a run's latest attempt's, or `ref` itself."""
    try:
        _, manifest = find_run(ref, storage)
    except SubmissionError:
        return ref
    return latest_attempt(manifest).get("submission_id") or ref


def run(args) -> int:
    job = job_of(args.submission_id, args.storage)
    handle = attach(job, target_of(args), args.address, **target_options(args))
    stopped = handle.stop()
    if not stopped:
        print(f"{job} was not running ({handle.status()})")
        return 0
    status = handle.wait() if args.wait else "stop requested"
    print(f"{job}: {status}")
    return 0
