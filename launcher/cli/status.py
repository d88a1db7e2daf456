"""`ftlaunch status ID`: the job's state, message and run folder."""

from launcher.cli.common import add_target_args, print_json, target_of
from launcher.client import attach


def add_parser(sub) -> None:
    p = sub.add_parser("status", help="show a job's status")
    p.add_argument("submission_id")
    add_target_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    handle = attach(args.submission_id, target_of(args), args.address)
    info = handle.info()
    row = {
        "submission_id": info.submission_id,
        "status": str(info.status.value),
        "message": info.message,
        "start_time": info.start_time,
        "end_time": info.end_time,
        "run_dir": handle.run_dir,
    }
    if args.json:
        print_json(row)
    else:
        print(f"{row['submission_id']}  {row['status']}  {row['message'] or ''}".rstrip())
        if handle.run_dir:
            print(f"artifacts: {handle.run_dir}")
    return 0
