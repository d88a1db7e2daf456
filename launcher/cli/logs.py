"""`ftlaunch logs ID [-f]`: the job's driver log, followed until it ends with -f."""

from launcher.cli.common import add_target_args, target_of
from launcher.client import attach, echo


def add_parser(sub) -> None:
    p = sub.add_parser("logs", help="print a job's logs")
    p.add_argument("submission_id")
    p.add_argument("-f", "--follow", action="store_true", help="follow until the job ends")
    add_target_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    handle = attach(args.submission_id, target_of(args), args.address)
    if args.follow:
        handle.wait(on_logs=echo)
    else:
        echo(handle.logs())
    return 0
