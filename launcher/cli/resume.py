"""`ftlaunch resume RUN`: continue a stopped or failed run from its last checkpoint."""

from launcher.cli.common import add_target_args, echo, target_of
from launcher.client import resume
from launcher.summary import format_summary


def add_parser(sub) -> None:
    p = sub.add_parser("resume", help="continue a stopped or failed run where it stopped")
    p.add_argument("run", help="a run folder, or a run id under --storage")
    p.add_argument("--storage", default="./runs", help="where run folders live (default ./runs)")
    add_target_args(p)
    p.add_argument("--no-wait", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    handle = resume(args.run, target_of(args), address=args.address, storage=args.storage)
    print(f"ftlaunch: resumed as {handle.submission_id}; artifacts in {handle.run_dir}")
    if args.no_wait:
        return 0
    status = handle.wait(on_logs=echo)
    print(f"ftlaunch: job {handle.submission_id} {status}")
    if status == "SUCCEEDED":
        print(format_summary(handle.manifest()))
    return 0 if status == "SUCCEEDED" else 1
