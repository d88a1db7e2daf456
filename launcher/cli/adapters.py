"""`ftlaunch adapters list [RUN]`: a multitask run's adapter registry (or every run's)."""

from pathlib import Path

from common.runfolder import run_folders
from common.runstore import is_remote, join, local_run
from common.units import size
from launcher.cli.common import print_json
from launcher.registry import FILE, load_registry, resolve_run


def add_parser(sub) -> None:
    p = sub.add_parser("adapters", help="list the adapters a multitask run registered")
    p.add_argument("action", choices=("list",))
    p.add_argument("run", nargs="?", help="a run folder or run id (default: every run under --storage)")
    p.add_argument("--storage", default="./runs", help="where run folders live (default ./runs)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    runs = [resolve_run(args.run, args.storage)] if args.run else _registered(args.storage)
    rows = [{"run": r.name, "task": task, **entry}
            for r in runs for task, entry in sorted(load_registry(r)["adapters"].items())]
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        print(f"no adapters registered under {args.run or args.storage}")
        return 0
    print(f"{'run':<34} {'task':<14} {'eval loss':>19} {'steps':>5} {'size':>9}  {'sha256':<12} created")
    for row in rows:
        ev = row.get("eval", {})
        before, after = ev.get("eval_loss_before"), ev.get("eval_loss")
        loss = f"{before:.3f} -> {after:.3f}" if before is not None and after is not None else "-"
        print(f"{row['run'][:34]:<34} {row['task']:<14} {loss:>19} {row.get('steps', '-'):>5} "
              f"{size(row['bytes']):>10}  {row['sha256'][:12]:<12} {row['created']}")
    return 0


def _registered(storage: str) -> list[Path]:
    """The run folders under `storage` that hold a registry (a bucket's: its cache, the manifest
    and registry pulled)."""
    if not is_remote(storage):
        return sorted(p.parent for p in Path(storage).glob(f"*/{FILE}"))
    pulled = [local_run(join(storage, folder.name), only=(FILE,)) for folder, _ in run_folders(storage)]
    return sorted(folder for folder in pulled if (folder / FILE).is_file())
