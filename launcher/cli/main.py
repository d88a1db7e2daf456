"""`ftlaunch`: a tiny base that parses arguments and calls the public API. One verb per module."""

from __future__ import annotations

import argparse
import importlib
import sys

from launcher.errors import LauncherError

VERBS = ("validate", "plan", "submit", "status", "logs", "stop", "list", "cluster", "data",
         "resume", "render", "validate-k8s", "claims", "adapters", "infer", "report", "model")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ftlaunch", description="Declarative fine-tuning jobs on Ray.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb in VERBS:
        importlib.import_module(f"launcher.cli.{verb.replace('-', '_')}").add_parser(sub)
    return p


def main(argv=None) -> int:
    args, extra = parser().parse_known_args(argv)
    # key=value overrides may come after options: `submit spec.yaml --no-wait a.b=1`
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser().error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args) or 0)
    except LauncherError as exc:
        if args.debug:
            raise
        # One line, whatever the message holds (a library's multi-line text, a key with a newline).
        message = " | ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"ftlaunch: error: {message or type(exc).__name__}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ftlaunch: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
