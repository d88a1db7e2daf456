"""`ftlaunch infer RUN --input TEXT`: a run's trained model answers (greedy), the answer only.

Any finetune run, one variant of a compare run (`--variant`), one stage of a pipeline of finetune
stages (`--stage`; default the last), or one adapter of a multitask run (`--task`, repeatable for a
mixed batch). Chat and instruction runs get the input as the user's
turn through the run's chat template.
"""

import difflib
import warnings
from pathlib import Path

from common.runfolder import REGISTRY, run_path


def add_parser(sub) -> None:
    p = sub.add_parser("infer", help="answer inputs with a run's trained model (greedy)")
    p.add_argument("run", help="a run folder or run id")
    p.add_argument("--input", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--file", help="a file of prompts, one per line")
    p.add_argument("--task", action="append",
                   help="multitask runs: the adapter; repeat it once per input for a mixed batch")
    p.add_argument("--variant", help="compare runs: the variant whose model answers")
    p.add_argument("--stage", help="pipeline runs: the stage whose result answers (default: the last)")
    p.add_argument("--system", help="a system message before each input (chat and instruction runs)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--storage", default="./runs", help="where run folders live (default ./runs)")
    p.set_defaults(func=run)


def run(args) -> int:
    with warnings.catch_warnings():  # transformers' and peft's deprecation notices are not the answer
        warnings.simplefilter("ignore", FutureWarning)
        return answer(args)


def answer(args) -> int:
    from launcher.errors import LauncherError
    from launcher.inference import AdapterSet, RunModel  # torch is imported here, only when asked for

    inputs = list(args.input)
    if args.file:
        try:
            inputs += [line for line in Path(args.file).read_text().splitlines() if line.strip()]
        except OSError as exc:
            raise LauncherError(f"--file {args.file}: {exc.strerror}; pass a text file, one prompt per line") from None
    if not inputs:
        raise LauncherError("nothing to answer: give --input TEXT or --file FILE")
    if args.max_new_tokens <= 0:
        raise LauncherError(f"--max-new-tokens {args.max_new_tokens} must be positive")
    folder = run_path(args.run, args.storage)
    if (folder / REGISTRY).is_file():
        from launcher.registry import load_registry

        known = sorted(load_registry(folder)["adapters"])
        if not args.task and len(known) > 1:
            raise LauncherError(f"run {folder.name} has adapters {', '.join(known)}; name one with --task")
        for task in args.task or []:  # before the model loads
            if task not in known:
                hint = difflib.get_close_matches(task, known, n=1)
                fix = f"did you mean {hint[0]!r}?" if hint else f"use one of: {', '.join(known)}"
                raise LauncherError(f"--task {task!r}: run {folder.name} has no such adapter; {fix}")
        tasks = args.task or [None]
        if len(tasks) not in (1, len(inputs)):
            raise LauncherError(f"{len(tasks)} --task for {len(inputs)} inputs; give one, or one per input")
        tasks = tasks * len(inputs) if len(tasks) == 1 else tasks
        adapters = AdapterSet(folder, tasks=sorted({t for t in tasks if t}) or None)
        answers = adapters.generate(inputs, tasks=[t or adapters.active for t in tasks],
                                    max_new_tokens=args.max_new_tokens, system=args.system)
    else:
        if args.task:
            raise LauncherError(f"--task: run {folder.name} has no adapter registry (not a multitask run); drop --task")
        answers = RunModel(folder, variant=args.variant, stage=args.stage).generate(
            inputs, args.max_new_tokens, args.system)
    for answer in answers:
        print(answer)
    return 0
