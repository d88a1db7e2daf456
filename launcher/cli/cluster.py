"""`ftlaunch cluster up|down|status`: the embedded local Ray head."""

from cluster import local
from launcher.cli.common import print_json


def add_parser(sub) -> None:
    p = sub.add_parser("cluster", help="start, stop or show the embedded local Ray head")
    p.add_argument("action", choices=("up", "down", "status"))
    p.add_argument("--num-cpus", type=int, help="CPUs the head offers (default: all)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.action == "up":
        head = local.up(num_cpus=args.num_cpus)
        print(f"local Ray head up: {head.address} (pid {head.pid}, {_offers(head)}); "
              "stop it with: ftlaunch cluster down")
        return 0
    if args.action == "down":
        from launcher.client import embedded_head_down

        stopped, lost = embedded_head_down()
        print("local Ray head stopped" if stopped else "no local Ray head was running")
        for manifest in lost:
            print(f"run {manifest['run_id']} was running on it: LOST; {manifest['error'].split('; ', 1)[-1]}")
        return 0
    head = local.status()
    if args.json:
        print_json(head.__dict__ if head else None)
    else:
        print(f"up: {head.address} (pid {head.pid}, {_offers(head)})" if head else "down")
    return 0 if head else 1


def _offers(head) -> str:
    """`4 CPUs` or `16 CPUs, 1 GPU`: what the head offers Ray."""
    gpus = f", {head.num_gpus} GPU{'s' if head.num_gpus != 1 else ''}" if head.num_gpus else ""
    return f"{head.num_cpus} CPUs{gpus}"
