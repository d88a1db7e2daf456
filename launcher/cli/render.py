"""`ftlaunch render k8s SPEC --profile P --image I [--out FILE]`: a spec as a KubeRay RayJob manifest."""

from __future__ import annotations

import sys
from pathlib import Path

from launcher.cli.common import add_image_args
from launcher.k8s.constants import SUBMISSION_MODES


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("render", help="render a spec as a KubeRay manifest (no cluster needed)")
    p.add_argument("target", choices=["k8s"], help="what to render")
    p.add_argument("spec", help="job spec YAML")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of the spec")
    p.add_argument("--profile", help="required: the node shape the pods get, a profile name "
                   "(cluster/profiles.yaml; cpu-8 for a CPU job) or a YAML file with the same keys")
    p.add_argument("--out", help="write the manifest here instead of stdout")
    add_image_args(p)
    p.add_argument("--namespace", default="default")
    p.add_argument("--queue", help="Kueue LocalQueue; the RayJob starts suspended until admitted")
    p.add_argument("--submission-mode", default="K8sJobMode", choices=SUBMISSION_MODES)
    p.set_defaults(func=run)


def run(args) -> int:
    from launcher.jobplan import plan
    from launcher.k8s.render import dump_manifest
    from launcher.spec import load_spec
    from launcher.targets.k8s import render

    job_plan = plan(load_spec(args.spec, tuple(args.overrides)), target=args.target)
    manifest = render(job_plan, args.profile, image=args.image, allow_default_image=args.allow_default_image,
                      namespace=args.namespace, queue=args.queue, submission_mode=args.submission_mode)
    text = dump_manifest(manifest, f"# kubectl apply -f {args.out or 'FILE'}\n")
    for warning in job_plan.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if not args.image:
        print("note: the default image does not contain ftlaunch: replace it before applying this "
              "manifest (or render with --image)", file=sys.stderr)
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}" + ("" if not args.image else f"; next: kubectl apply -f {args.out}"),
              file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
