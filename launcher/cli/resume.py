"""`ftlaunch resume RUN [key=value ...]`: continue a stopped or failed run from its last checkpoint."""

import argparse

from launcher.cli.common import EXIT_CODES, add_storage_arg, add_target_args, ended_badly, interrupted, target_of
from launcher.client import resume
from launcher.console import Console
from launcher.jobplan import RESUMABLE
from launcher.summary import format_summary


def add_parser(sub) -> None:
    p = sub.add_parser("resume", help="continue a stopped or failed run where it stopped", epilog=EXIT_CODES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run folder, or a run id under --storage")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help=f"what a resume may change: {', '.join(RESUMABLE)} (e.g. train.max_steps=200)")
    add_storage_arg(p)
    add_target_args(p)
    p.add_argument("--no-wait", action="store_true")
    p.add_argument("--verbose", action="store_true", help="print all of the job's log (by default only "
                   "ftlaunch's lines; the rest stays in the run's logs)")
    p.add_argument("--stop-on-interrupt", action="store_true",
                   help="Ctrl-C stops the job (by default it leaves the job running and says how to follow it)")
    p.set_defaults(func=run)


def run(args) -> int:
    handle = resume(args.run, target_of(args), address=args.address, storage=args.storage,
                    overrides=tuple(args.overrides))
    print(f"ftlaunch: resumed as {handle.submission_id}; artifacts in {handle.run_dir}")
    if args.no_wait:
        return 0
    console = Console(verbose=args.verbose)
    try:
        status = handle.wait(on_logs=console.write)
    except KeyboardInterrupt:
        interrupted(handle, args.stop_on_interrupt)
    finally:
        console.close()
    print(f"ftlaunch: job {handle.submission_id} {status}")
    if status == "SUCCEEDED":
        print(format_summary(handle.manifest()))
        return 0
    return ended_badly(handle, status)
