"""`ftlaunch validate SPEC [KEY=VALUE ...] [--target T]`: report every problem in a spec at once,
and what the spec's kind does not run (on that target)."""

from launcher.cli.common import add_spec_args
from launcher.spec import load_spec
from launcher.targets import TARGETS


def add_parser(sub) -> None:
    p = sub.add_parser("validate", help="check a spec without planning or submitting")
    add_spec_args(p)
    p.add_argument("--target", choices=TARGETS, default="local",
                   help="where it would run: a model planned for clusters only is refused on local")
    p.set_defaults(func=run)


def run(args) -> int:
    spec = load_spec(args.spec, tuple(args.overrides), target=args.target)
    print(f"{args.spec}: valid {spec.kind} spec '{spec.name}'")
    return 0
