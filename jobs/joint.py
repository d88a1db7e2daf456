"""`kind: multitask`, `mode: joint`: one shared backbone, one classification head per task,
trained together in one Ray Train run on an exact weighted mixture of the tasks' streams.

The story: each task's train rows tokenized through Ray Data (one dataset per task) -> one Ray
Train worker: the backbone with its strategy (full, freeze patterns, LoRA) and a linear head per
task -> every task's eval before -> each step one task's micro-batch, the task chosen by the
weighted schedule (jobs/data/mix.py: after n steps each task had its share of them, to within
one) -> every report: each task's train loss and eval loss and accuracy, in metrics-<task>.jsonl
-> export joint/: backbone/ (LoRA merged into it) with its tokenizer, heads/<task>.safetensors,
heads.json -> the summary, per task. launcher.inference.JointModel reloads the export.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import time
from typing import Callable, Iterator

import torch

from common.runfolder import JOINT_EXPORT, dir_size, metrics_file
from jobs import components as C
from jobs import strategies as S
from jobs.artifacts import RunDir
from jobs.data.badrows import BAD_ROWS_DIR, skipped_rows, train_guard
from jobs.data.ingest import endless, micro_batches
from jobs.data.mix import weighted_schedule
from jobs.data.read import read_dataset, read_head, task_args
from jobs.loop import Loop, mean_loss, run_worker
from launcher.inference import HEADS_JSON, joint_logits
from launcher.spec import ModelSpec, ResourcesSpec
from launcher.strategies import get_strategy

PROBE = "probe.pt"  # the trained model's logits on each task's first eval texts: a reload must match


def run(spec, plan: dict, run_dir: RunDir) -> dict:
    from ray.train.torch import TorchTrainer

    res = spec.resources
    datasets = {t.name: task_dataset(t, spec.model) for t in spec.tasks}
    one_worker = ResourcesSpec(workers=1, cpus_per_worker=res.cpus_per_worker, gpus_per_worker=res.gpus_per_worker)
    trainer = TorchTrainer(
        train_loop, train_loop_config={"spec": spec.model_dump(mode="json"), "run_dir": str(run_dir.path)},
        datasets=datasets,
        **C.ray_train_configs(one_worker, plan["run_id"], run_dir.ray_storage(), spec.train.max_failures))
    started = time.time()
    with run_dir.progress(spec.train.max_steps):
        result = trainer.fit()
    final = result.metrics or {}
    tasks = final.get("tasks") or {}
    for name, task in tasks.items():  # a pass's bad rows skipped, by the worker's count
        task["bad_rows_skipped"] = skipped_rows(run_dir.path / BAD_ROWS_DIR / name)
    run_dir.update_manifest(tasks={n: {"status": "SUCCEEDED", "steps": t["batches"], "eval": {
        "eval_loss_before": t["eval_loss_before"], "eval_loss": t["eval_loss_after"],
        "eval_accuracy_before": t["eval_accuracy_before"], "eval_accuracy": t["eval_accuracy_after"]}}
        for n, t in tasks.items()})
    return {"mode": "joint", "wall_time_s": round(time.time() - started, 2), "steps": final.get("step"),
            "strategy": spec.strategy.type, "tasks": tasks, "trainable_params": final.get("trainable_params"),
            "total_params": final.get("total_params"), "export": JOINT_EXPORT,
            "export_bytes": dir_size(run_dir.path / JOINT_EXPORT)}


def task_dataset(task, model_spec: ModelSpec):
    """A task's train rows as tokenized rows (input_ids, attention_mask, labels), in file order:
    one task of each stage at once (a stream per task)."""
    data = task.data
    ds = read_dataset(data.train, columns=C.read_columns(data))
    ds = ds.map_batches(C.tokenize_classification, batch_format="numpy", **task_args(1), fn_kwargs={
        "column": data.columns.get("text", "text"), "label": data.columns.get("label", "label"),
        "seq_len": model_spec.seq_len, "model_spec": model_spec, "data": data})
    ds.context.execution_options.preserve_order = True  # a seed fixes the row order
    return ds


def train_loop(config: dict) -> None:
    run_worker(_train_loop, config)


def _train_loop(spec, config: dict) -> None:
    import ray.train

    torch.set_num_threads(max(1, int(spec.resources.cpus_per_worker)))
    micro = spec.train.micro_batch

    def shard_stream(task) -> Callable[[], Iterator[dict]]:
        shard = ray.train.get_dataset_shard(task.name)
        guard = train_guard(task.data, config["run_dir"], 0, C.read_columns(task.data),
                            ledger=f"{BAD_ROWS_DIR}/{task.name}")
        return lambda: micro_batches(shard, micro, spec.model.seq_len, guard=guard)

    train_joint(spec, {t.name: shard_stream(t) for t in spec.tasks}, config["run_dir"],
                rank=ray.train.get_context().get_world_rank())


def arrow_stream(task, model_spec: ModelSpec, micro: int) -> Callable[[], Iterator[dict]]:
    """The same batches read with pyarrow alone, for in-process use without a cluster."""
    def one_pass():
        rows = C.load_split(task.data.train, task.data, 10**9)
        enc = C.tokenize_classification(rows, seq_len=model_spec.seq_len, model_spec=model_spec)
        for i in range(0, len(enc["labels"]) - micro + 1, micro):
            yield {k: torch.from_numpy(v[i:i + micro]) for k, v in enc.items()}

    return one_pass


# ---------------------------------------------------------------------------------------------
# The model: a backbone and a linear head per task


class JointNet(torch.nn.Module):
    def __init__(self, backbone, hidden: int, labels: dict[str, int]):
        super().__init__()
        self.backbone = backbone
        self.heads = torch.nn.ModuleDict({name: torch.nn.Linear(hidden, n) for name, n in labels.items()})

    def forward(self, task: str, input_ids, attention_mask):
        return joint_logits(self.backbone, self.heads[task], input_ids, attention_mask)


def build(spec) -> JointNet:
    """The backbone (the model's encoder, no head) under the spec's strategy, and fresh heads
    (same seed, same heads). The heads always train."""
    from transformers import AutoModel

    source = spec.model.source
    folder = C.minilm_dir() if source == "minilm" else source[3:]
    backbone = AutoModel.from_pretrained(folder, local_files_only=True, **spec.model.config)
    registered = get_strategy(spec.strategy)
    if registered.is_adapter:
        from peft import get_peft_model

        backbone = get_peft_model(backbone, registered.peft_config(spec.strategy, "FEATURE_EXTRACTION"))
    else:  # full and freeze: the names the registration trains (freeze: ['.'] trains none: heads only)
        trained = registered.trainable(spec.strategy, [n for n, _ in backbone.named_parameters()])
        S.set_trainable(backbone, lambda name: name in trained)
    torch.manual_seed(spec.train.seed)
    return JointNet(backbone, backbone.config.hidden_size, {t.name: t.num_labels for t in spec.tasks})


@torch.no_grad()
def evaluate(model: JointNet, task: str, rows: dict | None, model_spec: ModelSpec, batch_size: int = 16) -> dict:
    """A task's eval loss and accuracy through its head; {} without an eval split."""
    if not rows or not rows["text"]:
        return {}
    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    total, correct, n = 0.0, 0, len(rows["text"])
    for i in range(0, n, batch_size):
        part = {k: rows[k][i:i + batch_size] for k in ("text", "label")}
        enc = C.tokenize_classification(part, seq_len=model_spec.seq_len, model_spec=model_spec)
        ids, mask, labels = (torch.from_numpy(enc[k]).to(device) for k in C.TENSOR_COLUMNS)
        logits = model(task, ids, mask)
        total += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
    model.train(was_training)
    return {"loss": total / n, "accuracy": correct / n}



def _check_labels(task: str, labels: torch.Tensor, num_labels: int) -> None:
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_labels):
        raise ValueError(f"tasks.{task}: label {int(labels.max())} is outside 0..{num_labels - 1}; "
                         f"set tasks.{task}.num_labels to the number of classes of its data")


# ---------------------------------------------------------------------------------------------
# Training: one task's micro-batch per step, the tasks in the weighted schedule's order


def train_joint(spec, streams: dict, run_dir, *, rank: int = 0, progress: str | None = None) -> dict:
    """Train the backbone and heads to `train.max_steps`; returns the final summary fields (what
    the driver reads from the last report). `progress`: a file for the state when run in-process
    (else Ray Train's checkpoints)."""
    train, names = spec.train, [t.name for t in spec.tasks]
    tasks, run_dir = {t.name: t for t in spec.tasks}, RunDir(str(run_dir))
    device = "cuda" if spec.resources.gpus_per_worker > 0 and torch.cuda.is_available() else "cpu"
    model = build(spec).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in model.backbone.parameters() if p.requires_grad], "lr": train.lr},
              {"params": list(model.heads.parameters()), "lr": spec.head_lr or train.lr}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=train.weight_decay)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    evals = {n: C.load_split(t.data.eval, t.data, 16 * train.eval_batches) for n, t in tasks.items()}
    loop = Loop(run_dir, train.max_steps, train.report_every, rank=rank, progress=progress)
    curves = {n: Loop(run_dir, train.max_steps, train.report_every, rank=rank, metrics=metrics_file(n),
                      fields={"task": n}) for n in names}
    state = loop.restore(lambda path: _load_state(path, model, optimizer))
    if state:  # an earlier attempt got this far
        step, before, batches = state["step"], state["before"], state["batches"]
    else:
        step, batches = 0, {n: 0 for n in names}
        before = {n: evaluate(model, n, evals[n], spec.model) for n in names}
    for lp in (loop, *curves.values()):
        lp.truncate(step)

    def save(path):
        _save_state(path, model, optimizer, step, before, batches)

    # The schedule goes on where it stopped: the mix is exact over the whole run, resumed or not.
    schedule = weighted_schedule([tasks[n].weight for n in names], skip=step)
    iters = {n: endless(streams[n], n) for n in names}
    window, final_fields = {n: [] for n in names}, {}
    model.train()
    loop.begin()
    while step < train.max_steps:
        name = names[next(schedule)]
        batch = next(iters[name])
        ids, mask, labels = (batch[k].to(device) for k in C.TENSOR_COLUMNS)
        _check_labels(name, labels, tasks[name].num_labels)
        for group, lr in zip(optimizer.param_groups, base_lrs):
            group["lr"] = lr * C.warmup(step, train.warmup_steps)
        loss = torch.nn.functional.cross_entropy(model(name, ids, mask), labels)
        optimizer.zero_grad(set_to_none=True)  # the other heads keep grad None: AdamW leaves them be
        loss.backward()
        if train.grad_clip:
            torch.nn.utils.clip_grad_norm_(trainable, train.grad_clip)
        optimizer.step()
        step += 1
        batches[name] += 1
        window[name].append(loss.detach())
        loop.add(loss.detach(), len(labels))
        loop.stepped(step)
        if not loop.due(step):
            continue
        now = {n: evaluate(model, n, evals[n], spec.model) for n in names}
        task_loss = {n: mean_loss(w) for n, w in window.items()}
        if rank == 0:
            for n in names:
                run_dir.append(metrics_file(n), curves[n].record(
                    step, loss=task_loss[n], batches=batches[n], **{f"eval_{k}": v for k, v in now[n].items()}))
        record = loop.record(step, lr=optimizer.param_groups[0]["lr"], **{f"loss_{n}": v for n, v in task_loss.items()})
        window, extra = {n: [] for n in names}, None
        if loop.final(step):
            final_fields = _final_fields(model, before, now, batches, step)
            if rank == 0:
                export(model, spec, run_dir.path, evals)
            extra = final_fields
        loop.report(record, save=save, extra=extra)
    return final_fields


def _final_fields(model, before: dict, after: dict, batches: dict, steps: int) -> dict:
    trainable, total = C.parameter_counts(model)
    tasks = {n: {"batches": batches[n], "share": batches[n] / steps,
                 **{f"eval_{k}_before": before[n].get(k) for k in ("loss", "accuracy")},
                 **{f"eval_{k}_after": after[n].get(k) for k in ("loss", "accuracy")}} for n in batches}
    return {"tasks": tasks, "trainable_params": trainable, "total_params": total}


def _state_file(path: str) -> str:
    """Ray Train's checkpoint folder holds state.pt; a progress file is the state itself."""
    return os.path.join(path, "state.pt") if os.path.isdir(path) else path


def _save_state(path: str, model, optimizer, step: int, before: dict, batches: dict) -> None:
    trainable = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.save({"trainable": trainable, "optimizer": optimizer.state_dict(), "step": step,
                "before": before, "batches": dict(batches)}, _state_file(path))


def _load_state(path: str, model, optimizer) -> dict:
    state = torch.load(_state_file(path), weights_only=False)
    C.restore_trainable(model, state["trainable"], optimizer, state["optimizer"])
    print(f"[ftlaunch] joint run: continuing from step {state['step']}", flush=True)
    return state


# ---------------------------------------------------------------------------------------------
# Export: one folder, the backbone and every head


def export(model: JointNet, spec, run_path, evals: dict) -> None:
    """joint/ beside the run: backbone/ (a LoRA backbone merged into its base) with the tokenizer,
    heads/<task>.safetensors, heads.json; probe.pt: the trained logits a reload must reproduce."""
    from safetensors.torch import save_file

    backbone = model.backbone
    if get_strategy(spec.strategy).is_adapter:  # a copy: the model trained stays as it is
        backbone = copy.deepcopy(backbone).merge_and_unload()
    tmp = tempfile.mkdtemp(dir=run_path, prefix=".joint-")
    backbone.save_pretrained(os.path.join(tmp, "backbone"))
    C.tokenizer_for(spec.model).save_pretrained(os.path.join(tmp, "backbone"))
    os.makedirs(os.path.join(tmp, "heads"))
    description = {"backbone": "backbone", "pooling": "mean", "seq_len": spec.model.seq_len,
                   "strategy": spec.strategy.type, "tasks": {}}
    for t in spec.tasks:
        head = model.heads[t.name]
        save_file({"weight": head.weight.detach().cpu().contiguous(), "bias": head.bias.detach().cpu().contiguous()},
                  os.path.join(tmp, "heads", f"{t.name}.safetensors"))
        description["tasks"][t.name] = {"num_labels": t.num_labels, "file": f"heads/{t.name}.safetensors",
                                        "label_names": _label_names(t)}
    with open(os.path.join(tmp, HEADS_JSON), "w") as f:
        json.dump(description, f, indent=2)
    target = os.path.join(run_path, JOINT_EXPORT)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    probe = {}
    for t in spec.tasks:
        texts = (evals[t.name] or {}).get("text", [])[:8] or list(C.PROBE_CLS)
        enc = C.tokenize_classification({"text": texts, "label": [0] * len(texts)}, seq_len=spec.model.seq_len,
                                        model_spec=spec.model)
        model.eval()
        with torch.no_grad():
            logits = model(t.name, *(torch.from_numpy(enc[k]).to(next(model.parameters()).device)
                                     for k in ("input_ids", "attention_mask")))
        model.train()
        probe[t.name] = {"texts": texts, "logits": logits.cpu()}
    torch.save(probe, os.path.join(run_path, PROBE))


def _label_names(task) -> list[str] | None:
    """The class names a synthetic set records in its schema (`label_names`), when its data has them."""
    try:
        meta = read_head(task.data.train, C.read_columns(task.data), 1).schema.metadata or {}
    except Exception:  # names are a nicety: a set without them is predicted by index
        return None
    names = meta.get(b"label_names", b"").decode().split(",")
    return names if len(names) == task.num_labels and all(names) else None
