"""`ftlaunch render k8s SPEC [--profile P] [--out FILE]`: a spec as a KubeRay RayJob manifest."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from launcher.errors import ConfigError

DEFAULT_PROFILE = "a100-80g-1"
PROFILE_KEYS = ("name", "nodes", "gpus_per_node", "gpu_memory_gib", "gpu_model", "cpus_per_node", "memory_gib")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("render", help="render a spec as a KubeRay manifest (no cluster needed)")
    p.add_argument("target", choices=["k8s"], help="what to render")
    p.add_argument("spec", help="job spec YAML")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of the spec")
    p.add_argument("--profile", default=DEFAULT_PROFILE, help="resource profile name, or a YAML file holding one")
    p.add_argument("--out", help="write the manifest here instead of stdout")
    p.add_argument("--image", help="image with the project installed (default: the rayproject image)")
    p.add_argument("--namespace", default="default")
    p.add_argument("--queue", help="Kueue LocalQueue; the RayJob starts suspended until admitted")
    p.add_argument("--submission-mode", default="K8sJobMode",
                   choices=["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"])
    p.set_defaults(func=run)


def run(args) -> int:
    from launcher.k8s.render import dump_manifest, render_rayjob
    from launcher.k8s.validate import validate_manifest
    from launcher.jobplan import plan
    from launcher.spec import load_spec

    job_plan = plan(load_spec(args.spec, tuple(args.overrides)), target="k8s")
    manifest = render_rayjob(job_plan, load_profile(args.profile), image=args.image,
                             namespace=args.namespace, queue=args.queue,
                             submission_mode=args.submission_mode)
    problems = validate_manifest(manifest)
    if problems:  # a renderer bug, not a user error: say so loudly
        raise RuntimeError("rendered RayJob is invalid:\n" + "\n".join(problems))
    text = dump_manifest(manifest, f"# kubectl apply -f {args.out or 'FILE'}\n")
    for warning in job_plan.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if not args.image:
        print("note: the default image does not contain ftlaunch; pass --image with one that does",
              file=sys.stderr)
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}; next: kubectl apply -f {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def load_profile(ref: str) -> dict:
    """A profile dict from a YAML file, or by name from cluster/profiles (written separately)."""
    path = Path(ref)
    if path.suffix in (".yaml", ".yml", ".json") and path.is_file():
        data = yaml.safe_load(path.read_text())
        return _check(data, ref)
    from cluster import profiles

    found = profiles.get_profile(ref)
    # The planner's profiles are per node (gpus, cpus); the renderer names them per node too.
    return _check({
        "name": found["name"], "nodes": found["nodes"], "gpus_per_node": found["gpus"],
        "gpu_memory_gib": found["gpu_memory_gib"], "gpu_model": found["gpu_model"],
        "cpus_per_node": found["cpus"], "memory_gib": found["memory_gib"],
    }, ref)


def _check(data, ref: str) -> dict:
    if not isinstance(data, dict):
        raise ConfigError(f"--profile {ref}: a profile is a YAML mapping with keys {', '.join(PROFILE_KEYS)}")
    missing = [k for k in PROFILE_KEYS if k not in data]
    if missing:
        raise ConfigError(f"--profile {ref}: missing {', '.join(missing)}; add them")
    return data
