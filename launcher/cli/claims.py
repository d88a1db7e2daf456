"""`ftlaunch claims`: the design document's memory and size claims, answered by the planner."""


def add_parser(sub) -> None:
    p = sub.add_parser("claims", help="check the design document's memory claims with the planner")
    p.set_defaults(func=run)


def run(args) -> int:
    from launcher.planner.claims import format_claims

    print(format_claims())
    return 0
