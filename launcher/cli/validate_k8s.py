"""`ftlaunch validate-k8s FILE...`: offline KubeRay checks (schema, CEL, operator rules) of manifests."""

from __future__ import annotations

import sys

from launcher.errors import ConfigError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("validate-k8s", help="validate RayJob/RayCluster manifests offline")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--strict", action="store_true",
                   help="also apply ftlaunch's pod security policy (non-root, limits, no inline secrets) "
                   "and check the job's paths are on volumes its pods mount")
    p.set_defaults(func=run)


def run(args) -> int:
    import yaml

    from launcher.k8s.validate import mount_problems, security_problems, validate_file

    failed = 0
    for path in args.files:
        try:
            problems = validate_file(path)
            if args.strict and not problems:
                docs = [d for d in yaml.safe_load_all(open(path)) if d]
                problems = [f"{path}: {p}" for d in docs for p in security_problems(d) + mount_problems(d)]
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}; check the path") from None
        if problems:
            failed += 1
            print("\n".join(problems), file=sys.stderr)
        else:
            print(f"{path}: ok")
    return 1 if failed else 0
