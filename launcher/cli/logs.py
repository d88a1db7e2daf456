"""`ftlaunch logs RUN [-f] [--workers]`: the job's log, from the cluster or, when the cluster is
gone or no longer knows the job, from the run folder (`<run>/logs/`, written while the job ran)."""

import sys
from pathlib import Path

from common.runstore import local_run
from launcher.cli.common import add_k8s_args, add_target_args, echo, target_of, target_options
from launcher.client import attach, find_run
from launcher.console import Console
from launcher.errors import ClusterError, SubmissionError
from launcher.summary import format_summary


def add_parser(sub) -> None:
    p = sub.add_parser("logs", help="print a job's logs (from storage when the cluster is gone)")
    p.add_argument("submission_id", metavar="RUN", help="a submission id, run id or run folder")
    p.add_argument("-f", "--follow", action="store_true", help="follow until the job ends (ftlaunch's lines only, "
                   "unless --verbose)")
    p.add_argument("--verbose", action="store_true", help="with -f: every line of the job's log")
    p.add_argument("--workers", action="store_true", help="also print each worker's stored log")
    p.add_argument("--storage", default="./runs", help="where run folders are (default ./runs)")
    add_target_args(p)
    add_k8s_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        handle = attach(args.submission_id, target_of(args), args.address, **target_options(args))
    except (ClusterError, SubmissionError) as exc:
        try:
            run_dir, _ = find_run(args.submission_id, args.storage)
        except SubmissionError:
            raise exc from None
        print(f"ftlaunch: {exc}; the logs stored in {run_dir / 'logs'}:", file=sys.stderr)
        echo(stored_logs(run_dir, args.workers))
        return 0
    if args.follow:
        console = Console(verbose=args.verbose)
        status = handle.wait(on_logs=console.write)
        console.close()
        if status == "SUCCEEDED" and handle.run_dir:  # as submit ends: the readable summary
            print(format_summary(handle.manifest()))
    else:
        echo(handle.logs())
    if args.workers and handle.run_dir:
        echo(stored_logs(local_run(handle.run_dir), workers=True, driver=False))
    return 0


def stored_logs(run_dir: Path, workers: bool = False, driver: bool = True) -> str:
    logs = run_dir / "logs"
    names = (["driver.log"] if driver else []) + (
        sorted(p.name for p in logs.glob("*.log") if p.name != "driver.log") if workers else [])
    parts = []
    for name in names:
        path = logs / name
        text = path.read_text(errors="replace") if path.exists() else "(not written)\n"
        parts.append(text if name == "driver.log" and not workers else f"--- {name}\n{text}")
    return "".join(parts)
