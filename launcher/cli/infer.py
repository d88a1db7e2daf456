"""`ftlaunch infer RUN --task T --input TEXT`: complete text with one of a run's adapters."""

from launcher.registry import resolve_run


def add_parser(sub) -> None:
    p = sub.add_parser("infer", help="run a multitask run's adapter on some inputs")
    p.add_argument("run", help="a run folder or run id")
    p.add_argument("--task", required=True, action="append",
                   help="the adapter; repeat it once per --input for a mixed batch")
    p.add_argument("--input", required=True, action="append", help="a prompt (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--storage", default="./runs", help="where run folders live (default ./runs)")
    p.set_defaults(func=run)


def run(args) -> int:
    from launcher.errors import LauncherError
    from launcher.inference import AdapterSet  # torch is imported here, only when asked for

    if len(args.task) not in (1, len(args.input)):
        raise LauncherError(f"{len(args.task)} --task for {len(args.input)} --input; give one, or one per input")
    tasks = args.task * len(args.input) if len(args.task) == 1 else args.task
    adapters = AdapterSet(resolve_run(args.run, args.storage), tasks=sorted(set(tasks)))
    for text, task, completion in zip(args.input, tasks, adapters.generate(
            args.input, tasks=tasks, max_new_tokens=args.max_new_tokens)):
        print(f"[{task}] {text}{completion}")
    return 0
