"""Arguments several verbs share."""

from __future__ import annotations

import json

from launcher.jobplan import TARGETS


def add_spec_args(p) -> None:
    p.add_argument("spec", help="the job spec (YAML)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.max_steps=50")


def add_target_args(p, targets=TARGETS) -> None:
    p.add_argument("--target", choices=targets, default="local",
                   help="local: the embedded Ray head (default); ray: any cluster by address")
    p.add_argument("--address", help="Ray dashboard address (else RAY_ADDRESS)")


def print_json(data) -> None:
    print(json.dumps(data, indent=2, default=str))


def target_of(args) -> str:
    """An explicit address means a remote cluster unless --target says otherwise."""
    return "ray" if args.address and args.target == "local" else args.target
