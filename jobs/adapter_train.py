"""Training LoRA adapters on a frozen base, in one worker: `train_adapter` (one task, its own
copy of the base: the fan-out worker) and `train_packed` (K tasks on one shared base, one forward
and backward per step through jobs/packed_lora.py). Both report through jobs/loop.py's `Loop`,
resume from their progress file (jobs/multitask_progress.py) and save each adapter as a plain
peft adapter under `adapters/<task>/`, returning its registry entry. jobs/multitask.py decides
which worker trains which tasks.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common.runfolder import metrics_file
from jobs import components as C
from jobs import generate as G
from jobs import precision as P
from jobs import text as T
from jobs.data.badrows import BAD_ROWS_DIR, skipped_rows
from jobs.data.ingest import endless
from jobs.loop import Loop, progress_file
from jobs.multitask_progress import PACKED, load_progress, save_progress
from jobs.packed_lora import PackedLora
from launcher.kinds.multitask import TaskSettings
from launcher.strategies import get_strategy
from launcher.strategies.lora import LoraStrategy

ADAPTERS_DIR = "adapters"


class Phases:
    """Seconds per phase of a worker, in its entry: where its time went. `load` (base, adapters,
    first eval), `first_step` (the first step's data and compute: allocation and warm-up),
    `data_wait` and `compute` (every later step: the steady state), `report`, `export`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._mark = time.perf_counter()
        self._first = True  # until the first step's last part

    def __call__(self, what: str) -> None:
        now = time.perf_counter()
        self.seconds[what] = round(self.seconds.get(what, 0.0) + now - self._mark, 3)
        self._mark = now

    def step(self, what: str, ends: bool = False) -> None:
        """A part of a training step (`ends`: its last); the first step's parts are first_step."""
        self("first_step" if self._first else what)
        self._first = self._first and not ends


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
def eval_loss(model, batch: dict | None, device: str, bs: int = 16, precision: str = "fp32"):
    if batch is None:
        return None
    total, count = 0.0, 0
    for i in range(0, len(batch["input_ids"]), bs):
        part = {k: v[i:i + bs].to(device) for k, v in batch.items()}
        inputs = T.model_inputs(part, T.attention_of(model))
        with P.autocast(precision, torch.device(device).type):
            logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        loss, mask = token_losses(logits, part["labels"])
        total += float((loss * mask).sum())
        count += int(mask.sum())
    return total / max(count, 1)


def lora_config(lora: LoraStrategy):
    return get_strategy(lora).peft_config(lora, "CAUSAL_LM")  # the strategy's own peft config


def precision_of(tasks: list[TaskSettings], device: str) -> str:
    """The precision the adapters train in: the spec's train.precision (every task has it: a task
    cannot override it), else bf16 on a GPU and fp32 on a CPU, as the finetune engine."""
    return P.resolve(tasks[0].train.precision, 1 if device == "cuda" else 0)


def load_base(base_path: str, device: str, precision: str = "fp32"):
    """The frozen base on `device` and the digest of its weights as saved (the registry's base
    identity, whatever dtype it trains in): 16-bit on a GPU when the adapters train in 16-bit
    (its weights never update, so they need no fp32 copy), as saved otherwise."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(base_path)
    sha = C.digest(t for _, t in sorted(model.state_dict().items()))
    half = device == "cuda" and precision != "fp32"
    model = model.to(device=device, dtype=P.DTYPES[precision]) if half else model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, sha


def adapter_params(model, name: str) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if ".lora_" in n and n.endswith(f".{name}.weight")]



def train_adapter(task: TaskSettings, base_path: str, stream, run_dir: str, seq_len: int,
                  device: str = "cpu") -> dict:
    """One task, one adapter, on its own copy of the base: the fan-out worker's story."""
    from peft import get_peft_model

    name, train = task.name, task.train
    torch.manual_seed(train.seed)
    phase = Phases()
    precision = precision_of([task], device)
    base, base_sha = load_base(base_path, device, precision)
    model = get_peft_model(base, lora_config(task.lora), adapter_name=name)
    P.trainable_in_fp32(model)
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
        before = eval_loss(model, evals, device, precision=precision)
        exact = {f"eval_{k}_before": v for k, v in G.evaluate(model, task.model, task.data, pairs).items()}
    loop.truncate(step)

    def save(path):
        save_progress(path, model, optimizer, [name], {name: step}, {name: losses}, {name: before})

    model.train()
    batches = endless(stream, name)
    phase("load")
    while step < train.max_steps:
        batch = {k: v.to(device) for k, v in next(batches).items()}
        phase.step("data_wait")
        for group in optimizer.param_groups:  # by the adapter's own step: a resumed run goes on warming up
            group["lr"] = train.lr * C.warmup(step, train.warmup_steps)
        inputs = T.model_inputs(batch, T.attention_of(model))
        inputs.pop("labels")  # the loss is token_losses' (the same mean as transformers')
        with P.autocast(precision, torch.device(device).type):
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
        phase.step("compute", ends=True)
        if loop.due(step):
            loop.report(loop.record(step, loss=float(np.mean(losses[-train.report_every:]))), save=save)
            phase("report")
    after = eval_loss(model, evals, device, precision=precision)
    exact.update({f"eval_{k}_after": v for k, v in G.evaluate(model, task.model, task.data, pairs).items()})
    entry = _export(model, name, run_dir, base_sha, step, losses, before, after, loop.started,
                    packed=False, task=task, exact=exact)
    phase("export")
    return {**entry, "phases_s": phase.seconds}


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
    phase = Phases()
    precision = precision_of(tasks, device)
    base, base_sha = load_base(base_path, device, precision)
    first, *rest = tasks
    model = get_peft_model(base, lora_config(first.lora), adapter_name=first.name)
    for t in rest:
        torch.manual_seed(t.train.seed)  # each adapter starts where it would alone
        model.add_adapter(t.name, lora_config(t.lora))
    P.trainable_in_fp32(model)
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
            before = {n: packed_eval_loss(pack, n, b, device, precision) for n, b in evals.items()}
        for n in names:
            loops[n].truncate(steps[n])
            loops[n].begin()

        def save(path):
            save_progress(path, model, optimizer, names, steps, losses, before)

        iters = {n: endless(streams[n], n) for n in names}
        done_at = {n: loops[n].started for n in names if loops[n].final(steps[n])}
        phase("load")
        while len(done_at) < len(tasks):
            active = [n for n in steps if not loops[n].final(steps[n])]
            for group, t in zip(optimizer.param_groups, tasks):  # each adapter's warmup by its own step
                group["lr"] = t.train.lr * C.warmup(steps[t.name], t.train.warmup_steps)
            batches = {n: next(iters[n]) for n in active}
            phase.step("data_wait")
            losses_now = packed_step(pack, optimizer, batches, params,
                                     {n: by_name[n].train.grad_clip for n in active}, device, precision)
            phase.step("compute", ends=True)
            for n, value in losses_now.items():
                steps[n] += 1
                losses[n].append(value)
                if loops[n].due(steps[n]):
                    every = by_name[n].train.report_every
                    loops[n].report(loops[n].record(steps[n], loss=float(np.mean(losses[n][-every:]))), save=save)
                    phase("report")
                if loops[n].final(steps[n]):
                    done_at[n] = time.time()
        after = {n: packed_eval_loss(pack, n, b, device, precision) for n, b in evals.items()}
    # Out of the pack: peft's own layers (holding the trained parameters) save each adapter.
    entries = {n: _export(model, n, run_dir, base_sha, steps[n], losses[n], before[n], after[n], loops[n].started,
                          packed=True, task=by_name[n], finished=done_at[n])
               for n in steps}
    phase("export")
    return {n: {**entry, "phases_s": phase.seconds} for n, entry in entries.items()}  # the pack's, in each


def packed_eval_loss(pack: PackedLora, name: str, batch: dict | None, device: str, precision: str = "fp32"):
    """One adapter's eval loss on the packed model: every row is that adapter's."""
    with pack.rows([name]):
        return eval_loss(pack.model, batch, device, precision=precision)


def packed_step(pack: PackedLora, optimizer, batches: dict, params: dict, clips: dict, device: str = "cpu",
                precision: str = "fp32") -> dict:
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
        with P.autocast(precision, torch.device(device).type):
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
