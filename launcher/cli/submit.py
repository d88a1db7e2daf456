"""`ftlaunch submit SPEC`: plan, submit, and tail the job; the exit code is the job's result."""

import sys

from launcher.cli.common import add_spec_args, add_target_args, target_of
from launcher.jobplan import plan
from launcher.spec import load_spec
from launcher.client import echo, submit
from launcher.summary import format_summary


def add_parser(sub) -> None:
    p = sub.add_parser("submit", help="submit a job and follow it")
    add_spec_args(p)
    add_target_args(p)
    p.add_argument("--submission-id", help="idempotent: an existing id returns that job")
    p.add_argument("--profile", help="refuse unless the job fits this cluster profile")
    p.add_argument("--kubeconfig", help="k8s target: create the RayJob with this kubeconfig")
    p.add_argument("--image", help="k8s target: an image with ftlaunch installed")
    p.add_argument("--namespace", default="default", help="k8s target: the namespace")
    p.add_argument("--no-wait", action="store_true", help="return right after submitting")
    p.add_argument("--quiet", action="store_true", help="follow without printing the job's logs")
    p.set_defaults(func=run)


def run(args) -> int:
    job_plan = plan(load_spec(args.spec, tuple(args.overrides)), target_of(args),
                    submission_id=args.submission_id, profile=args.profile)
    for warning in job_plan.warnings:
        print(f"ftlaunch: warning: {warning}", file=sys.stderr)
    if job_plan.target == "k8s":
        return submit_k8s(job_plan, args)
    handle = submit(job_plan, address=args.address)
    sid = handle.submission_id
    verb = "already submitted" if handle.existing else "submitted"
    print(f"ftlaunch: {verb} {sid} to {handle.address}")
    print(f"ftlaunch: artifacts in {handle.run_dir}")
    addr = f" --address {args.address}" if args.address else ""
    print(f"ftlaunch: next: ftlaunch status {sid}{addr} | ftlaunch logs -f {sid}{addr} | "
          f"ftlaunch stop {sid}{addr}")
    if args.no_wait:
        return 0
    status = handle.wait(on_logs=None if args.quiet else echo)
    print(f"ftlaunch: job {sid} {status}")
    if status == "SUCCEEDED":
        print(format_summary(handle.manifest()))
        return 0
    message = handle.info().message
    if message:
        print(f"ftlaunch: {message.strip().splitlines()[-1]}", file=sys.stderr)
    return 1


def submit_k8s(job_plan, args) -> int:
    """Render the RayJob, validate it offline, then create it (kubeconfig) or write it to a file."""
    from launcher.cli.render import DEFAULT_PROFILE, load_profile
    from launcher.errors import PlanError
    from launcher.k8s.render import render_rayjob
    from launcher.k8s.submit import submit_rayjob
    from launcher.k8s.validate import validate_manifest

    manifest = render_rayjob(job_plan, load_profile(args.profile or DEFAULT_PROFILE),
                             image=args.image, namespace=args.namespace)
    problems = validate_manifest(manifest)
    if problems:
        raise PlanError("the rendered RayJob is invalid: " + "; ".join(problems))
    out = submit_rayjob(manifest, kubeconfig=args.kubeconfig, out_dir=".")
    name, ns = manifest["metadata"]["name"], manifest["metadata"]["namespace"]
    if out["mode"] == "file":
        print(f"ftlaunch: no kubeconfig; wrote the RayJob to {out['path']}")
        print(f"ftlaunch: next: {out['command']}")
        return 0
    print(f"ftlaunch: created RayJob {ns}/{name}")
    print(f"ftlaunch: next: ftlaunch status {name} --target k8s --namespace {ns} | "
          f"kubectl get rayjob -n {ns} {name}")
    return 0
