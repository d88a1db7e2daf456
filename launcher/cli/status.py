"""`ftlaunch status RUN`: a run's state from its folder (step/total, loss, eval, ETA, start,
duration), reconciled with its cluster when that answers; a job whose folder is elsewhere: the
cluster's view of it (a RayJob's, on k8s)."""

from launcher.cli.common import add_k8s_args, add_storage_arg, add_target_args, print_json, target_of, target_options
from launcher.client import attach, run_status
from launcher.runs import status_lines


def add_parser(sub) -> None:
    p = sub.add_parser("status", help="show a run's status")
    p.add_argument("run", metavar="RUN", help="a run id, a run folder, or a submission id")
    add_storage_arg(p)
    add_target_args(p)
    p.add_argument("--json", action="store_true")
    add_k8s_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    target, options = target_of(args), target_options(args)
    row = run_status(args.run, target, args.address, args.storage, **options)
    if row is not None:
        lines = status_lines(row)
    else:  # the run folder is on the cluster's storage, not here
        handle = attach(args.run, target, args.address, **options)
        row = handle.row()
        lines = handle.format_row(row)
    if args.json:
        print_json(row)
    else:
        print("\n".join(lines))
    return 0
