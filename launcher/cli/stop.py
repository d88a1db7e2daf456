"""`ftlaunch stop ID`: ask the cluster to stop a job (on k8s: delete its RayJob)."""

from launcher.cli.common import add_k8s_args, add_target_args, target_of, target_options
from launcher.client import attach


def add_parser(sub) -> None:
    p = sub.add_parser("stop", help="stop a running job")
    p.add_argument("submission_id")
    add_target_args(p)
    add_k8s_args(p)
    p.add_argument("--wait", action="store_true", help="wait until it has stopped")
    p.set_defaults(func=run)


def run(args) -> int:
    handle = attach(args.submission_id, target_of(args), args.address, **target_options(args))
    stopped = handle.stop()
    if not stopped:
        print(f"{args.submission_id} was not running ({handle.status()})")
        return 0
    status = handle.wait() if args.wait else "stop requested"
    print(f"{args.submission_id}: {status}")
    return 0
