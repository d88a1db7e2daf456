"""`ftlaunch`: a tiny base that parses arguments and calls the public API. One verb per module."""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

from launcher.cli.common import Detached
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
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a reader that has gone (`| head -1`) shows here, not at exit
        return code
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
    except Detached as done:
        # Python's teardown of the modules a submit loads (torch, Ray's client) took 10-20 s after a
        # Ctrl-C; the job runs on and this process holds nothing to release: leave at once.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(done.code)
    except BrokenPipeError:  # `ftlaunch list | head -1`: the reader has gone, which is no error
        return _reader_gone()


def _reader_gone() -> int:
    # Python flushes stdout again at exit and would print a second BrokenPipeError: point the
    # descriptor at /dev/null first (as the `signal` module's docs advise).
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
