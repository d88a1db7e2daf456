"""`ftlaunch submit SPEC`: plan, submit, and tail the job; the exit code is the job's result."""

import argparse
import sys

from launcher.cli.common import (
    EXIT_CODES,
    add_image_args,
    add_k8s_args,
    add_spec_args,
    add_target_args,
    ended_badly,
    interrupted,
    target_of,
    target_options,
)
from launcher.client import submit
from launcher.console import Console
from launcher.jobplan import plan
from launcher.spec import load_spec
from launcher.summary import format_summary


def add_parser(sub) -> None:
    p = sub.add_parser("submit", help="submit a job and follow it", epilog=EXIT_CODES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_spec_args(p)
    add_target_args(p)
    p.add_argument("--submission-id", help="idempotent: an existing id returns that job")
    p.add_argument("--profile", help="refuse unless the job fits this cluster profile (k8s: required; "
                   "it sizes the RayJob's pods)")
    add_k8s_args(p)
    add_image_args(p)
    p.add_argument("--no-wait", action="store_true", help="return right after submitting")
    p.add_argument("--quiet", action="store_true", help="follow without printing the job's logs")
    p.add_argument("--verbose", action="store_true", help="print all of the job's log (Ray's and the "
                   "libraries' lines too; by default only ftlaunch's lines, the rest stays in the run's logs)")
    p.add_argument("--stop-on-interrupt", action="store_true",
                   help="Ctrl-C stops the job (by default it leaves the job running and says how to follow it)")
    p.set_defaults(func=run)


def run(args) -> int:
    job_plan = plan(load_spec(args.spec, tuple(args.overrides)), target_of(args),
                    submission_id=args.submission_id, profile=args.profile)
    for warning in job_plan.warnings:
        print(f"ftlaunch: warning: {warning}", file=sys.stderr)
    handle = submit(job_plan, address=args.address, **target_options(args))
    for line in handle.submitted_lines():
        print(line if line.startswith("  ") else f"ftlaunch: {line}")  # a command pastes as printed
    if args.no_wait or not handle.follows:
        return 0
    console = Console(verbose=args.verbose)
    try:
        status = handle.wait(on_logs=None if args.quiet else console.write)
    except KeyboardInterrupt:
        interrupted(handle, args.stop_on_interrupt)
    finally:
        console.close()
    print(f"ftlaunch: job {handle.submission_id} {status}")
    if status == "SUCCEEDED":
        print(format_summary(handle.manifest()))
        return 0
    return ended_badly(handle, status)

