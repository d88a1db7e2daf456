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
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from common.runfolder import metrics_file
from jobs import components as C
from jobs import generate as G
from jobs import precision as P
from jobs import text as T
from jobs.artifacts import RunDir, say
from jobs.data.badrows import BAD_ROWS_DIR, skipped_rows, train_guard
from jobs.data.ingest import micro_batches
from jobs.data.read import read_dataset, read_head
from jobs.loop import Loop, progress_file, worker_scope
from jobs.multitask_progress import PACKED, discard_progress, load_progress, save_progress
from jobs.packed_lora import PackedLora
from jobs.preempt import GRACE_EXIT, Preempted
from launcher import registry as R
from launcher.kinds.multitask import TaskSettings, typed_task_settings
from launcher.spec import DataSpec
from launcher.strategies import get_strategy
from launcher.strategies.lora import LoraStrategy

BASE_DIR, TOKENIZER_DIR, ADAPTERS_DIR = "base", "tokenizer", "adapters"


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
               "cpus": res.cpus_per_worker, "gpus": res.gpus_per_worker,
               "data_cpus": res.data_cpus_per_worker, "env": spec.env,
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
    torch.set_num_threads(max(1, int(context["cpus"])))
    device = "cuda" if context["gpus"] > 0 and torch.cuda.is_available() else "cpu"
    seq_len = context["model"].seq_len
    # t.model: the base's
    streams = {t.name: ray_data_stream(t, seq_len, context["data_cpus"], context["run_dir"]) for t in tasks}
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


def ray_data_stream(task: TaskSettings, seq_len: int, cpus: float, run_dir: str) -> Callable[[], Iterator[dict]]:
    """One pass over a task's train split, streamed through Ray Data, as tensor batches.

    Its read and tokenize tasks ask `cpus` each (resources.data_cpus_per_worker): the planner
    leaves that much beside every running worker, so K streams run beside K workers.
    """
    import ray.data

    data, micro = task.data, task.train.micro_batch
    guard = train_guard(data, run_dir, 0, T.read_columns(data), ledger=f"{BAD_ROWS_DIR}/{task.name}")

    def one_pass():
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # a seed fixes the row order
        # Ray 2.60's V2 Parquet reader adds a file-listing step that asks a whole CPU and cannot
        # be told otherwise; K such streams on a small cluster starve. The V1 reader runs only
        # read tasks of the `cpus` asked here.
        ctx.use_datasource_v2 = False
        ds = read_dataset(data.train, columns=T.read_columns(data), num_cpus=cpus)  # every format
        ds = T.stream(ds, task.model, data, seq_len, num_cpus=cpus)
        yield from micro_batches(ds, micro, seq_len, guard=guard)

    return one_pass


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


def eval_batch(task: TaskSettings, seq_len: int, limit: int) -> dict | None:
    """The first `limit` eval rows, encoded as the train rows are (jobs/text.py), unpacked."""
    path = task.data.eval
    if not path or limit <= 0:
        return None
    rows = C.load_split(path, task.data, limit)
    data = task.data.model_copy(update={"packing": False})
    return {k: torch.from_numpy(v) for k, v in T.encode(rows, task.model, data, seq_len).items()}


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token next-token loss and its mask (the same mean as transformers' causal-LM loss)."""
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
        ignore_index=-100, reduction="none").view(shift_labels.shape)
    return loss, (shift_labels != -100)


@torch.no_grad()
def eval_loss(model, batch: dict | None, device: str, bs: int = 16):
    if batch is None:
        return None
    total, count = 0.0, 0
    for i in range(0, len(batch["input_ids"]), bs):
        part = {k: v[i:i + bs].to(device) for k, v in batch.items()}
        inputs = T.model_inputs(part, T.attention_of(model))
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        loss, mask = token_losses(logits, part["labels"])
        total += float((loss * mask).sum())
        count += int(mask.sum())
    return total / max(count, 1)


def lora_config(lora: LoraStrategy):
    return get_strategy(lora).peft_config(lora, "CAUSAL_LM")  # the strategy's own peft config


def load_base(base_path: str, device: str):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(base_path).to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, C.digest(t for _, t in sorted(model.state_dict().items()))


def adapter_params(model, name: str) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if ".lora_" in n and n.endswith(f".{name}.weight")]


def _batches(stream: Callable[[], Iterator[dict]]) -> Iterator[dict]:
    """Endless batches: pass after pass over the task's data."""
    while True:
        empty = True
        for batch in stream():
            empty = False
            yield batch
        if empty:
            raise ValueError("the train split yields no full micro-batch; lower train.micro_batch")


def train_adapter(task: TaskSettings, base_path: str, stream, run_dir: str, seq_len: int,
                  device: str = "cpu") -> dict:
    """One task, one adapter, on its own copy of the base: the fan-out worker's story."""
    from peft import get_peft_model

    name, train = task.name, task.train
    torch.manual_seed(train.seed)
    phases, mark = {}, time.perf_counter()

    def phase(what: str) -> None:  # seconds per phase, in the entry: where a worker's time went
        nonlocal mark
        now = time.perf_counter()
        phases[what] = round(phases.get(what, 0.0) + now - mark, 3)
        mark = now

    base, base_sha = load_base(base_path, device)
    model = get_peft_model(base, lora_config(task.lora), adapter_name=name)
    if train.grad_checkpointing:
        P.enable_checkpointing(model)
    params = adapter_params(model, name)
    optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    evals = eval_batch(task, seq_len, 16 * train.eval_batches)
    loop = Loop(run_dir, train.max_steps, train.report_every, metrics=metrics_file(name),
                fields={"task": name}, progress=progress_file(run_dir, f"task-{name}"))
    saved = loop.restore(lambda path: load_progress(path, model, optimizer, [name]))
    step, losses, exact = 0, [], {}
    # Instruction and chat tasks: greedy answers to the eval prompts (not re-measured on resume).
    pairs = G.eval_pairs(task.data.eval, task.data, train.eval_generate) if G.enabled(task.data, train) else []
    if saved:  # an earlier attempt got this far: continue from its last report
        step, losses, before = saved["steps"][name], saved["losses"][name], saved["before"][name]
    else:
        before = eval_loss(model, evals, device)
        exact = {f"eval_{k}_before": v for k, v in G.evaluate(model, task.model, task.data, pairs).items()}
    loop.truncate(step)

    def save(path):
        save_progress(path, model, optimizer, [name], {name: step}, {name: losses}, {name: before})

    model.train()
    batches = _batches(stream)
    phase("load")
    while step < train.max_steps:
        batch = {k: v.to(device) for k, v in next(batches).items()}
        phase("data_wait")
        for group in optimizer.param_groups:  # by the adapter's own step: a resumed run goes on warming up
            group["lr"] = train.lr * C.warmup(step, train.warmup_steps)
        inputs = T.model_inputs(batch, T.attention_of(model))
        inputs.pop("labels")  # the loss is token_losses' (the same mean as transformers')
        logits = model(**inputs).logits
        loss_tok, mask = token_losses(logits, batch["labels"])
        loss = (loss_tok * mask).sum() / mask.sum().clamp(min=1)  # rows cut before any answer: no loss, not NaN
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if train.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, train.grad_clip)
        optimizer.step()
        step += 1
        losses.append(float(loss.detach()))
        phase("compute")
        if loop.due(step):
            loop.report(loop.record(step, loss=float(np.mean(losses[-train.report_every:]))), save=save)
            phase("report")
    after = eval_loss(model, evals, device)
    exact.update({f"eval_{k}_after": v for k, v in G.evaluate(model, task.model, task.data, pairs).items()})
    entry = _export(model, name, run_dir, base_sha, step, losses, before, after, loop.started,
                    packed=False, task=task, exact=exact)
    phase("export")
    return {**entry, "phases_s": phases}


def train_packed(tasks: list[TaskSettings], base_path: str, streams: dict, run_dir: str, seq_len: int,
                 device: str = "cpu") -> dict:
    """K adapters on one shared frozen base, one forward and backward per step over all tasks' rows.

    The packed engine (jobs/packed_lora.py) runs each step's rows, one equal micro-batch per
    task, through the base once and through each task's adapter as one batched matmul. The
    loss is the sum of each task's own mean token loss, so each adapter's gradient comes from its
    task's rows only; each adapter is clipped and scheduled by itself: its training is the same
    as alone. A task whose steps are done drops out of the batch, and its adapter then gets no
    gradient and no update at all.
    """
    from peft import get_peft_model

    torch.manual_seed(tasks[0].train.seed)
    base, base_sha = load_base(base_path, device)
    first, *rest = tasks
    model = get_peft_model(base, lora_config(first.lora), adapter_name=first.name)
    for t in rest:
        torch.manual_seed(t.train.seed)  # each adapter starts where it would alone
        model.add_adapter(t.name, lora_config(t.lora))
    if any(t.train.grad_checkpointing for t in tasks):
        P.enable_checkpointing(model)
    params = {t.name: adapter_params(model, t.name) for t in tasks}
    for group in params.values():
        for p in group:
            p.requires_grad_(True)
    optimizer = torch.optim.AdamW(
        [{"params": params[t.name], "lr": t.train.lr, "weight_decay": t.train.weight_decay} for t in tasks])
    model.train()
    evals = {t.name: eval_batch(t, seq_len, 16 * t.train.eval_batches) for t in tasks}
    names, by_name = [t.name for t in tasks], {t.name: t for t in tasks}
    # One loop per task (its records, its reports); one progress file for the whole pack.
    loops = {t.name: Loop(run_dir, t.train.max_steps, t.train.report_every, metrics=metrics_file(t.name),
                          fields={"task": t.name}, progress=progress_file(run_dir, PACKED)) for t in tasks}
    steps, losses = {n: 0 for n in names}, {n: [] for n in names}
    saved = loops[names[0]].restore(lambda path: load_progress(path, model, optimizer, names))
    with PackedLora(model) as pack:
        if saved:  # an earlier attempt got this far: continue from its last report
            steps, losses, before = saved["steps"], saved["losses"], saved["before"]
        else:
            before = {n: packed_eval_loss(pack, n, b, device) for n, b in evals.items()}
        for n in names:
            loops[n].truncate(steps[n])
            loops[n].begin()

        def save(path):
            save_progress(path, model, optimizer, names, steps, losses, before)

        iters = {n: _batches(streams[n]) for n in names}
        done_at = {n: loops[n].started for n in names if loops[n].final(steps[n])}
        while len(done_at) < len(tasks):
            active = [n for n in steps if not loops[n].final(steps[n])]
            for group, t in zip(optimizer.param_groups, tasks):  # each adapter's warmup by its own step
                group["lr"] = t.train.lr * C.warmup(steps[t.name], t.train.warmup_steps)
            losses_now = packed_step(pack, optimizer, {n: next(iters[n]) for n in active}, params,
                                     {n: by_name[n].train.grad_clip for n in active}, device)
            for n, value in losses_now.items():
                steps[n] += 1
                losses[n].append(value)
                if loops[n].due(steps[n]):
                    every = by_name[n].train.report_every
                    loops[n].report(loops[n].record(steps[n], loss=float(np.mean(losses[n][-every:]))), save=save)
                if loops[n].final(steps[n]):
                    done_at[n] = time.time()
        after = {n: packed_eval_loss(pack, n, b, device) for n, b in evals.items()}
    # Out of the pack: peft's own layers (holding the trained parameters) save each adapter.
    return {n: _export(model, n, run_dir, base_sha, steps[n], losses[n], before[n], after[n], loops[n].started,
                       packed=True, task=by_name[n], finished=done_at[n])
            for n in steps}


def packed_eval_loss(pack: PackedLora, name: str, batch: dict | None, device: str):
    """One adapter's eval loss on the packed model: every row is that adapter's."""
    with pack.rows([name]):
        return eval_loss(pack.model, batch, device)


def packed_step(pack: PackedLora, optimizer, batches: dict, params: dict, clips: dict, device: str = "cpu") -> dict:
    """One packed update: the given tasks' rows (one equal micro-batch each, contiguous, in the
    batches' order) in one forward and backward; returns each task's loss."""
    names = list(batches)
    rows = [len(batches[n]["input_ids"]) for n in names]
    if len(set(rows)) != 1:
        raise ValueError(f"packed training needs one equal micro-batch per task (got {dict(zip(names, rows))} "
                         "rows); set the same train.micro_batch for every task")
    # Packed and padded rows in one forward: each padded row is one example (segment 1).
    keys = T.PACKED_COLUMNS if any("segment_ids" in b for b in batches.values()) else C.TENSOR_COLUMNS
    cat = {k: torch.cat([T.as_packed(batches[n])[k] if keys is T.PACKED_COLUMNS else batches[n][k]
                         for n in names]).to(device) for k in keys}
    inputs = T.model_inputs(cat, T.attention_of(pack.model))
    inputs.pop("labels")
    with pack.rows(names):  # the backward too: a checkpointed layer runs its forward again there
        logits = pack.model(**inputs).logits
        loss_tok, mask = token_losses(logits, cat["labels"])
        # Each task's own mean over its own rows (views of the contiguous segments).
        per_task = {n: (lt * m).sum() / m.sum().clamp(min=1)
                    for n, lt, m in zip(names, loss_tok.split(rows[0]), mask.split(rows[0]))}
        optimizer.zero_grad(set_to_none=True)  # absent tasks keep grad None: AdamW skips them
        sum(per_task.values()).backward()
    for n in names:
        if clips.get(n):
            torch.nn.utils.clip_grad_norm_(params[n], clips[n])
    optimizer.step()
    return {n: float(v.detach()) for n, v in per_task.items()}


def _export(model, name, run_dir, base_sha, steps, losses, before, after, started, *, packed, task,
            finished=None, exact=None) -> dict:
    """Save one adapter under adapters/<task>/ and return its registry entry."""
    target = Path(run_dir) / ADAPTERS_DIR / name
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=f".adapter-{name}-"))
    model.save_pretrained(tmp, selected_adapters=[name])
    saved = tmp / name if (tmp / name).is_dir() else tmp  # peft nests non-default adapter names
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(saved), target)
    shutil.rmtree(tmp, ignore_errors=True)
    return {
        "path": f"{ADAPTERS_DIR}/{name}",
        "base_sha256": base_sha,
        "steps": steps,
        "packed": packed,
        "data_task": task.data.task,
        "lora": task.lora.model_dump(include={"r", "alpha", "target_modules"}),
        "eval": {"eval_loss_before": before, "eval_loss": after,
                 "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
                 **(exact or {})},
        "wall_time_s": round((finished or time.time()) - started, 2),
        "trainable_params": sum(p.numel() for p in adapter_params(model, name)),
        "bad_rows_skipped": skipped_rows(Path(run_dir) / BAD_ROWS_DIR / name),
    }
