"""`ftlaunch status ID`: the job's state, message and run folder (a RayJob's, on k8s)."""

from launcher.cli.common import add_k8s_args, add_target_args, print_json, target_of, target_options
from launcher.client import attach


def add_parser(sub) -> None:
    p = sub.add_parser("status", help="show a job's status")
    p.add_argument("submission_id")
    add_target_args(p)
    p.add_argument("--json", action="store_true")
    add_k8s_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    handle = attach(args.submission_id, target_of(args), args.address, **target_options(args))
    row = handle.row()
    if args.json:
        print_json(row)
    else:
        print("\n".join(handle.format_row(row)))
    return 0
