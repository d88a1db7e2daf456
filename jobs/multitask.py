"""`kind: multitask`: one base model, one LoRA adapter per task, fanned out over the cluster.

The story: save the shared base and tokenizer -> read the registry (a resumed run keeps the
adapters already there) -> train the rest, either one Ray worker per adapter (a remote task with
its own CPU/GPU, streaming its own task's data through Ray Data) or all of them packed on one
frozen base in one worker -> register each finished adapter -> report every task's status.
A task that fails does not stop the others; the run then fails naming it, and `ftlaunch resume`
retrains only what is missing. A worker that dies is retried (train.max_failures times) and
continues from its progress file.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Callable, Iterator

import torch

from common.runfolder import metrics_file
from jobs import components as C
from jobs import text as T
from jobs.adapter_train import train_adapter, train_packed
from jobs.artifacts import RunDir, on_this_node, say
from jobs.data.badrows import BAD_ROWS_DIR, train_guard
from jobs.data.ingest import micro_batches
from jobs.data.read import read_dataset, read_head, task_args
from jobs.loop import worker_scope
from jobs.multitask_progress import PACKED, discard_progress
from jobs.preempt import GRACE_EXIT, Preempted
from launcher import registry as R
from launcher.kinds.multitask import TaskSettings, typed_task_settings
from launcher.spec import DataSpec

BASE_DIR, TOKENIZER_DIR = "base", "tokenizer"


def run(spec, plan: dict, run_dir: RunDir) -> dict:
    import ray

    tasks = [typed_task_settings(spec, t) for t in spec.tasks]
    base = prepare_base(spec, run_dir)
    registry = R.load_registry(run_dir.path)
    kept = [t.name for t in tasks
            if t.name in registry["adapters"] and R.intact(run_dir.path, registry["adapters"][t.name])]
    todo = [t for t in tasks if t.name not in kept]
    if kept:
        print(f"[ftlaunch] kept from an earlier attempt: {', '.join(kept)}; training: "
              f"{', '.join(t.name for t in todo) or 'nothing'}", flush=True)
    packed = spec.packing is True
    res = spec.resources
    context = {"model": spec.model, "base": base, "run_dir": str(run_dir.path),
               "cpus": res.cpus_per_worker, "gpus": res.gpus_per_worker, "env": spec.env,
               "preemption_grace_s": spec.train.preemption_grace_s}

    started = time.time()
    # One worker per adapter (or one for the pack); results are collected as each one ends, so
    # a finished adapter is registered even when another task is still running or has failed.
    groups = [todo] if packed and todo else [[t] for t in todo]
    # A worker process that dies is started again (train.max_failures times; -1: no limit) and
    # continues from its progress file; an error in the training code fails its tasks at once.
    remote = ray.remote(num_cpus=context["cpus"], num_gpus=context["gpus"],
                        max_retries=spec.train.max_failures)(_worker)
    # At most `at_once` workers run together: the planner counted each worker's CPUs and its
    # data stream's, and fitted that many on the cluster; the rest start as earlier ones end.
    at_once = max(1, int(plan["resources"].get("at_once") or len(groups)))
    waiting, pending, outcomes = list(groups), {}, {}
    # A progress line per report of each task (its own metrics file), as the finetune jobs print.
    with run_dir.progress({metrics_file(t.name): t.train.max_steps for t in todo}):
        while waiting or pending:
            while waiting and len(pending) < at_once:
                group = waiting.pop(0)
                pending[remote.remote(group, context)] = group
            ready, _ = ray.wait(list(pending), num_returns=1)
            group = pending.pop(ready[0])
            try:
                results = ray.get(ready[0])
            except Exception as exc:  # the worker died or raised: every task it held failed
                results = {t.name: {"status": "FAILED", "error": _error_line(exc)} for t in group}
            for name, result in results.items():
                outcomes[name] = result
                if result["status"] == "SUCCEEDED":
                    on_this_node(str(run_dir.path / result["entry"]["path"]))  # saved on another node
                    R.register(run_dir.path, name, result["entry"], base_record(spec, base), TOKENIZER_DIR)
                    discard_progress(run_dir.path, f"task-{name}")
                say(f"[ftlaunch] task {name}: {result['status']}"
                    + (f" ({result['error']})" if result.get("error") else ""))
            if packed and all(r["status"] == "SUCCEEDED" for r in results.values()):
                discard_progress(run_dir.path, PACKED)
            run_dir.update_manifest(tasks={**run_dir.read_manifest().get("tasks", {}),
                                           **{n: _status(r) for n, r in results.items()}})

    registry = R.load_registry(run_dir.path)
    statuses = {**{n: {"status": "SUCCEEDED", "kept": True} for n in kept},
                **{n: _status(r) for n, r in outcomes.items()}}
    run_dir.update_manifest(tasks=statuses)
    failed = sorted(n for n, s in statuses.items() if s["status"] != "SUCCEEDED")
    if failed:
        details = "; ".join(f"{n}: {statuses[n].get('error')}" for n in failed)
        raise RuntimeError(f"{len(failed)} of {len(tasks)} tasks failed ({details}); the others are "
                           f"in the registry; retrain the failed ones with: ftlaunch resume {plan['run_id']}")
    hashes = {e["base_sha256"] for e in registry["adapters"].values()}
    if len(hashes) != 1:
        raise RuntimeError(f"adapters were trained on different base weights ({sorted(hashes)})")
    return {
        "wall_time_s": round(time.time() - started, 2), "packing": packed, "trained": sorted(outcomes),
        "kept": sorted(kept), "base_sha256": hashes.pop(), "export": "adapters",
        "tasks": {n: {k: v for k, v in e.items() if k != "path"} for n, e in registry["adapters"].items()},
        "export_bytes": sum(e["bytes"] for e in registry["adapters"].values()),
    }


def _status(result: dict) -> dict:
    if result["status"] != "SUCCEEDED":
        return {"status": result["status"], "error": result.get("error")}
    entry = result["entry"]
    return {"status": "SUCCEEDED", "steps": entry["steps"], "eval": entry["eval"],
            "wall_time_s": entry["wall_time_s"], "bad_rows_skipped": entry.get("bad_rows_skipped", 0)}


def _error_line(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc
    lines = [line for line in str(cause).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(cause).__name__


def prepare_base(spec, run_dir: RunDir) -> str:
    """The base every adapter trains on: a path. A random-init base is saved once, here."""
    source = spec.model.source
    if source.startswith("hf:"):
        path = source[3:]
    else:
        path = str(run_dir.path / BASE_DIR)
        if not os.path.isdir(path):
            tmp = tempfile.mkdtemp(dir=run_dir.path, prefix=".base-")
            C.build_model(spec.model, seed=spec.train.seed).save_pretrained(tmp)
            os.replace(tmp, path)
    tok = run_dir.path / TOKENIZER_DIR
    if not tok.is_dir():  # the base's own tokenizer, with the chat template the tasks render with
        T.tokenizer_for(spec.model, tokenizer_data([t.data for t in spec.tasks])).save_pretrained(tok)
    return path


def tokenizer_data(datas: list[DataSpec]) -> DataSpec | None:
    """The task whose data decides the saved tokenizer's chat template: one naming a template,
    else a chat or instruction one (the plain instruction template without a template of its own)."""
    for want in (lambda d: d.chat_template, lambda d: d.task in ("chat", "instruction")):
        for d in datas:
            if want(d):
                return d
    return None


def base_record(spec, base_path: str) -> dict:
    source = spec.model.source
    path = BASE_DIR if not source.startswith("hf:") else base_path
    return {"id": source, "path": path, "config": spec.model.config}


# ---------------------------------------------------------------------------------------------
# The worker: one adapter, or several packed on one base


def _worker(tasks: list[TaskSettings], context: dict) -> dict:
    """Runs in its own Ray worker process; returns {task: {"status", "entry" | "error"}}."""
    began = time.time()
    context = {**context, "run_dir": str(RunDir(context["run_dir"]).path)}  # this node's mirror of a run in a store
    torch.set_num_threads(max(1, int(context["cpus"])))
    device = "cuda" if context["gpus"] > 0 and torch.cuda.is_available() else "cpu"
    seq_len = context["model"].seq_len
    # t.model: the base's
    streams = {t.name: ray_data_stream(t, seq_len, context["run_dir"]) for t in tasks}
    log = f"task-{tasks[0].name}" if len(tasks) == 1 else "packed"
    try:
        with worker_scope(context["env"], context["run_dir"], log, grace_s=context["preemption_grace_s"]):
            if len(tasks) == 1:
                entries = {tasks[0].name: train_adapter(
                    tasks[0], context["base"], streams[tasks[0].name], context["run_dir"], seq_len, device)}
            else:
                entries = train_packed(tasks, context["base"], streams, context["run_dir"], seq_len, device)
    except Preempted:
        # Its progress file holds this step: end as the SIGTERM would have, and Ray starts the
        # task again (max_retries counts a dead process, not an exception), continuing from it.
        os._exit(GRACE_EXIT)
    except Exception as exc:
        if len(tasks) > 1:
            raise
        return {tasks[0].name: {"status": "FAILED", "error": _error_line(exc)}}
    span = {"worker_started": began, "worker_finished": time.time(), "worker_pid": os.getpid()}
    return {name: {"status": "SUCCEEDED", "entry": {**entry, **span}} for name, entry in entries.items()}


def ray_data_stream(task: TaskSettings, seq_len: int, run_dir: str) -> Callable[[], Iterator[dict]]:
    """One pass over a task's train split, streamed through Ray Data, as tensor batches: one read
    and one tokenize task at once, asking no CPU (jobs/data/read.py task_args); the planner
    leaves resources.data_cpus_per_worker beside every running worker for them."""
    import ray.data

    data, micro = task.data, task.train.micro_batch
    guard = train_guard(data, run_dir, 0, T.read_columns(data), ledger=f"{BAD_ROWS_DIR}/{task.name}")

    def one_pass():
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # a seed fixes the row order
        yield from micro_batches(stream_dataset(task, seq_len), micro, seq_len, guard=guard)

    return one_pass


def stream_dataset(task: TaskSettings, seq_len: int):
    """A task's train split (every format) as model rows, one task of each stage at once."""
    ds = read_dataset(task.data.train, columns=T.read_columns(task.data))
    return T.stream(ds, task.model, task.data, seq_len, **task_args(1))


def arrow_stream(task: TaskSettings, seq_len: int) -> Callable[[], Iterator[dict]]:
    """The same batches read with pyarrow alone, for in-process use without a cluster."""
    data, micro = task.data, task.train.micro_batch

    def one_pass():
        table = read_head(data.train, columns=T.read_columns(data), role="train")
        enc = T.encode_rows({c: table.column(c).to_pylist() for c in table.column_names},
                            task.model, data, seq_len)
        for i in range(0, len(enc["input_ids"]) - micro + 1, micro):
            yield {k: torch.from_numpy(v[i:i + micro]) for k, v in enc.items()}

    return one_pass
