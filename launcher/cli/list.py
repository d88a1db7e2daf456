"""`ftlaunch list`: one row per run, oldest first: the run folders under --storage (runs of an
earlier head included) and the cluster's jobs, reconciled with the cluster when it answers."""

import sys

from launcher.cli.common import add_k8s_args, add_storage_arg, add_target_args, print_json, target_of, target_options
from launcher.client import list_runs
from launcher.runs import list_lines


def add_parser(sub) -> None:
    p = sub.add_parser("list", help="list runs (run folders and the cluster's jobs)")
    add_storage_arg(p)
    add_target_args(p)
    add_k8s_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    rows, note = list_runs(target_of(args), args.address, args.storage, **target_options(args))
    if note:
        print(f"ftlaunch: note: {note}", file=sys.stderr)
    if args.json:
        print_json(rows)
    else:
        print("\n".join(list_lines(rows)) if rows else f"no runs under {args.storage}")
    return 0
