"""Arguments several verbs share, and the terminal helpers they print with."""

from __future__ import annotations

import json
import sys

from launcher.targets import TARGETS, describe_targets


def add_spec_args(p) -> None:
    p.add_argument("spec", help="the job spec (YAML)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.max_steps=50")


def add_target_args(p, targets=TARGETS) -> None:
    p.add_argument("--target", choices=targets, default="local", help=describe_targets())
    p.add_argument("--address", help="Ray dashboard address (else RAY_ADDRESS)")


def add_k8s_args(p) -> None:
    p.add_argument("--namespace", default="default", help="k8s target: the RayJob's namespace")
    p.add_argument("--kubeconfig", help="k8s target: the kubeconfig (else KUBECONFIG, ~/.kube/config)")


def add_image_args(p) -> None:
    p.add_argument("--image", help="k8s target: an image with ftlaunch installed (required, unless "
                   "--allow-default-image)")
    p.add_argument("--allow-default-image", action="store_true",
                   help="k8s target: render with the plain rayproject image (it lacks ftlaunch: the "
                   "job fails until the image is replaced)")


def target_options(args) -> dict:
    """The flags a verb has that only some targets read (each target takes the ones it uses)."""
    names = ("namespace", "kubeconfig", "image", "profile", "allow_default_image")
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def print_json(data) -> None:
    print(json.dumps(data, indent=2, default=str))


def echo(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def target_of(args) -> str:
    """An explicit address means a remote cluster unless --target says otherwise."""
    return "ray" if args.address and args.target == "local" else args.target
