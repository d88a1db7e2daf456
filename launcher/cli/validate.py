"""`ftlaunch validate SPEC [KEY=VALUE ...]`: report every problem in a spec at once."""

from launcher.cli.common import add_spec_args
from launcher.spec import load_spec


def add_parser(sub) -> None:
    p = sub.add_parser("validate", help="check a spec without planning or submitting")
    add_spec_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    spec = load_spec(args.spec, tuple(args.overrides))
    print(f"{args.spec}: valid {spec.kind} spec '{spec.name}'")
    return 0
