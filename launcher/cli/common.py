"""Arguments several verbs share, and the terminal helpers they print with."""

from __future__ import annotations

import json
import sys
from typing import NoReturn

from launcher.targets import TARGETS, describe_targets

# What `submit` and `resume` exit with while they follow a job (their --help lists them).
SUCCEEDED, FAILED, STOPPED, INTERRUPTED = 0, 1, 3, 130
EXIT_CODES = f"""exit codes (following the job):
  {SUCCEEDED}    the job succeeded (also: --no-wait, once it is submitted)
  {FAILED}    the job failed, or it could not be planned or submitted
  {STOPPED}    the job was stopped (ftlaunch stop, from here or elsewhere); ftlaunch resume continues it
  {INTERRUPTED}  Ctrl-C: the job runs on (or is stopped, with --stop-on-interrupt)"""


def add_spec_args(p) -> None:
    p.add_argument("spec", help="the job spec (YAML)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.max_steps=50")


def add_target_args(p, targets=TARGETS) -> None:
    p.add_argument("--target", choices=targets, default="local", help=describe_targets())
    p.add_argument("--address", help="Ray dashboard address (else RAY_ADDRESS)")


def add_storage_arg(p) -> None:
    p.add_argument("--storage", default="./runs", help="where run folders live (default ./runs)")


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


class Detached(Exception):
    """Ctrl-C while following a job, handled: the CLI exits with `code` at once (see main)."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def interrupted(handle, stop: bool) -> NoReturn:
    """Ctrl-C while following: the job runs on (and we say how to reach it), or is stopped.
    Raises Detached: nothing of this process is left to clean up, so main exits at once."""
    if stop:
        handle.stop()
        print(f"\nftlaunch: stopped {handle.submission_id} (--stop-on-interrupt); continue it with: "
              f"ftlaunch resume {handle.run_dir}", file=sys.stderr)
    else:  # on stdout, as submit prints its other next commands
        lines = handle.detached_lines()
        print("\n" + "\n".join(line if line.startswith("  ") else f"ftlaunch: {line}" for line in lines),
              flush=True)
    raise Detached(INTERRUPTED)


def ended_badly(handle, status: str) -> int:
    """The exit code (and last word) of a followed job that did not succeed."""
    if status == "STOPPED":  # someone ran `ftlaunch stop`: not a crash
        print(f"ftlaunch: {handle.submission_id} was stopped before it finished; continue it with: "
              f"ftlaunch resume {handle.run_dir}", file=sys.stderr)
        return STOPPED
    message = handle.row()["message"]
    if message:
        print(f"ftlaunch: {message.strip().splitlines()[-1]}", file=sys.stderr)
    return FAILED
