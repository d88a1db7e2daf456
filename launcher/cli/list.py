"""`ftlaunch list`: jobs known to the cluster (on k8s: ftlaunch's RayJobs), oldest first."""

from launcher.cli.common import add_k8s_args, add_target_args, print_json, target_of, target_options
from launcher.client import list_jobs


def add_parser(sub) -> None:
    p = sub.add_parser("list", help="list jobs on the cluster")
    add_target_args(p)
    add_k8s_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    rows = list_jobs(target_of(args), args.address, **target_options(args))
    if args.json:
        print_json(rows)
        return 0
    for r in rows:
        print(f"{r['submission_id'] or '-':<48} {r['status'] or '-':<10} {r['kind'] or '-':<10} {r['name'] or '-'}")
    if not rows:
        print("no jobs")
    return 0
