"""`ftlaunch report RUN`: a run's curves, memory and artifacts as report/report.md and .html."""

from launcher.report import write_report


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="write a run's report: markdown, HTML and PNG curves")
    p.add_argument("run", help="a run folder, or a run id under --storage")
    p.add_argument("--storage", default="./runs", help="where run folders live (default ./runs)")
    p.set_defaults(func=run)


def run(args) -> int:
    for path in write_report(args.run, storage=args.storage):
        print(path)
    return 0
