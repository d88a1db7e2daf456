"""`kind: finetune`: one model, one strategy, data streamed through Ray Data into Ray Train.

The story: read data (mixed with replay rows) -> build the Ray Train run -> (each worker) build
model, apply strategy, learning-rate groups, EWC anchor, measure eval and retain before, resume if
a checkpoint exists, train (unfreezing on schedule) with periodic report + checkpoint -> measure
eval and retain after -> export -> summary with the forgetting deltas.
"""

from __future__ import annotations

import os
import shutil
import time

import ray
import ray.data
import ray.train
import torch
from ray.train.torch import TorchTrainer

from common.runfolder import EVENTS, copy_tree_atomic, dir_size
from jobs import components as C
from jobs import generate as G
from jobs import precision as P
from jobs import strategies as S
from jobs import tensorboard
from jobs import text as T
from jobs.artifacts import RunDir
from jobs.data.badrows import BAD_ROWS_DIR, skipped_rows, train_guard
from jobs.data.ingest import Stream
from jobs.data.read import micro_blocks, read_dataset, stream_tasks, task_args
from jobs.loop import Loop, run_worker
from launcher.strategies import get_strategy


def run(spec, plan: dict, run_dir: RunDir) -> dict:
    if spec.engine == "deepspeed":  # its own story: jobs/deepspeed_finetune.py
        from jobs import deepspeed_finetune
        return deepspeed_finetune.run(spec, plan, run_dir)
    train, res = spec.train, spec.resources

    # 1. Data: rows -> tokenized tensor columns (the model's own tokenizer; packed rows with
    # data.packing), streamed and split across the workers.
    train_ds, steps_per_epoch = train_dataset(spec, plan)

    # 2. The Ray Train run. Its name is the run id: a rerun of the same id resumes on purpose.
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"spec": spec.model_dump(mode="json"), "run_dir": str(run_dir.path),
                           "steps_per_epoch": steps_per_epoch},
        datasets={"train": train_ds},
        **C.ray_train_configs(res, plan["run_id"], run_dir.ray_storage(), train.max_failures),
    )
    started = time.time()
    with run_dir.progress(train.max_steps):
        result = trainer.fit()

    # 3. Export: the final checkpoint's adapter (or model) becomes the run's artifact.
    export_name = get_strategy(spec.strategy).export  # adapter/ for adapters, model/ otherwise
    target = run_dir.path / export_name
    with result.checkpoint.as_directory() as ckpt:
        copy_tree_atomic(os.path.join(ckpt, "export"), target)  # whole or not at all: a full disk keeps the old
        base = os.path.join(ckpt, "base")
        if os.path.isdir(base):
            copy_tree_atomic(base, run_dir.path / "base")
    T.tokenizer_for(spec.model, spec.data).save_pretrained(run_dir.path / "tokenizer")  # with its chat template

    metrics = run_dir.read_jsonl("metrics.jsonl")
    final = result.metrics or {}
    summary = {
        "wall_time_s": round(time.time() - started, 2),
        "steps": final.get("step"),
        "strategy": spec.strategy.type,
        "loss_first": metrics[0]["loss"] if metrics else None,
        "loss_last": metrics[-1]["loss"] if metrics else None,
    }
    # Before/after on the eval split and on the retain split (forgetting): loss, accuracy for
    # classification, exact match of greedy answers for instruction and chat; the deltas are
    # after - before (a positive retain loss delta = forgetting).
    for split in ("eval", "retain"):
        for metric in ("loss", "accuracy", "exact_match"):
            before, after = final.get(f"{split}_{metric}_before"), final.get(f"{split}_{metric}")
            if metric == "loss" or before is not None:
                summary[f"{split}_{metric}_before"], summary[f"{split}_{metric}_after"] = before, after
            if before is not None and after is not None:
                summary[f"{split}_{metric}_delta"] = after - before
    summary.update({k: final.get(k) for k in (
        "trainable_params", "total_params", "digests_before", "digests_after", "lr_groups",
        "unfrozen_at", "ewc_penalty_last", "replay_share", "padding_fraction", "rss_start_mb", "peak_rss_mb")})
    summary.update(export=export_name, export_bytes=dir_size(target),
                   bad_rows_skipped=skipped_rows(run_dir.path / BAD_ROWS_DIR))
    summary.update({k: final[k] for k in C.SPLIT_SKIPS if k in final})
    return summary


def train_dataset(spec, plan: dict):
    """The train stream as a Ray Dataset (replay mixed in), and the epoch's length in optimizer
    steps (each takes micro_batch x grad_accumulation rows per worker), for the unfreezing schedule."""
    data, train, res = spec.data, spec.train, spec.resources
    columns, tasks = C.read_columns(data), stream_tasks(res)

    def read(path, replayed=0):
        ds = C.tokenized(read_dataset(path, columns=columns, tasks=tasks), spec, tasks)
        if not data.replay:
            return ds
        # Mixing is per block: blocks of one micro-batch keep the replay share even over a few
        # steps. Every row says where it came from: the workers count the share they saw.
        ds = ds.map_batches(C.flag_rows, fn_kwargs={"value": replayed}, batch_format="numpy", **task_args(tasks))
        return micro_blocks(ds, train.micro_batch, tasks)

    train_ds = read(data.train)
    rows = {role: info.get("rows") for role, info in (plan.get("data") or {}).items()}
    stream_rows = rows.get("train")
    if data.replay:
        # Replay: old-task rows interleaved at `fraction` of the stream (DESIGN: 80% new / 20% old).
        from jobs.data.mix import mix_datasets

        fraction = data.replay.fraction
        train_ds = mix_datasets(train_ds, read(data.replay.path, 1), fraction,
                                seed=train.seed, new_rows=rows.get("train"), old_rows=rows.get("replay"))
        stream_rows = stream_rows and stream_rows / (1 - fraction)
    steps_per_epoch = (max(1, int(stream_rows // (train.micro_batch * train.grad_accumulation * res.workers)))
                       if stream_rows else train.max_steps)
    return train_ds, steps_per_epoch


def train_loop(config: dict) -> None:
    run_worker(_train_loop, config)


def _train_loop(spec, config: dict) -> None:
    run_dir, train, data = RunDir(config["run_dir"]), spec.train, spec.data
    ctx = ray.train.get_context()
    loop = Loop(run_dir, train.max_steps, train.report_every,
                rank=ctx.get_world_rank(), world=ctx.get_world_size())
    torch.set_num_threads(max(1, int(spec.resources.cpus_per_worker)))
    rss_start, resuming = S.rss_mb(), loop.has_state()
    # The data stream starts now: its first read overlaps the model build and the before-eval.
    stream = Stream(ray.train.get_dataset_shard("train"), train.micro_batch, spec.model.seq_len,
                    guard=train_guard(data, run_dir.path, loop.rank, C.read_columns(data)))
    # A random-init base exists nowhere else: rank 0 keeps it, to go beside the adapter.
    pending = os.path.join(run_dir.path, ".base-pending")
    keep = (loop.rank == 0 and not resuming and spec.model.source in C.RANDOM_INIT_SOURCES
            and get_strategy(spec.strategy).is_adapter)
    model, optimizer, trained, unfreezer, ewc = _build(spec, config["steps_per_epoch"], keep and pending)
    trainable, total = C.parameter_counts(model)
    dropped: dict = {}  # the eval and retain splits' bad rows skipped, by path
    eval_rows = C.load_split(data.eval, data, train.eval_batches * 16, dropped)
    retain_rows = C.load_split(data.retain, data, train.eval_batches * 16, dropped)
    generated = G.eval_pairs(data.eval, data, train.eval_generate) if loop.rank == 0 and G.enabled(data, train) else []

    step, before = loop.resume(lambda path: C.load_checkpoint(path, model, optimizer)), {}
    if resuming:
        before = run_dir.read_manifest().get("before", {})
    elif loop.rank == 0:  # measured once, before any update: the baseline for eval gain and forgetting
        before = {f"{split}_{k}_before": v for split, rows in (("eval", eval_rows), ("retain", retain_rows))
                  for k, v in C.evaluate(model, rows, spec).items()}
        before.update({f"eval_{k}_before": v for k, v in G.evaluate(model, spec.model, data, generated).items()})
        before["digests_before"] = C.frozen_and_trainable_digests(model, trained)
        before.update(C.split_skips(dropped, data))
        run_dir.update_manifest(before=before)
        tensorboard.before(run_dir.path, before)
    # On resume: the groups already open by then.
    unfrozen_at = {step: unfreezer.at(model, step)} if unfreezer else {}
    model = _prepare(model, trained if unfreezer else None)
    inner = C.unwrap(model)
    # A resumed run continues its warmup where it stopped (the scheduler counts from the resume).
    start = step
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: C.warmup(start + s, train.warmup_steps))
    # Precision, accumulation and clipping: max_steps and every report count optimizer steps.
    # Elastic workers: fewer ranks accumulate more micro-batches, so the global batch stays.
    accumulation = C.accumulation_for(train.grad_accumulation, spec.resources.workers, loop.world)
    sized = {"workers": loop.world, "global_batch": train.micro_batch * accumulation * loop.world} \
        if spec.resources.min_workers else {}
    stepper = P.Stepper(model, optimizer, precision=P.resolve(train.precision, spec.resources.gpus_per_worker),
                        accumulation=accumulation, grad_clip=train.grad_clip)

    def save(path, final):
        C.save_checkpoint(path, model, optimizer, step, export=final)
        if final and os.path.isdir(pending):
            shutil.move(pending, os.path.join(path, "base"))

    penalty, seen = None, {"replay": 0, "rows": 0, "tokens": 0, "slots": 0}
    attention = T.attention_of(model)
    model.train()
    loop.begin()
    while step < train.max_steps:
        for batch in stream:
            opened = unfreezer.at(inner, step) if unfreezer else None
            if opened:
                unfrozen_at[step] = opened
                if loop.rank == 0:
                    run_dir.append(EVENTS, {"event": "unfreeze", "step": step, "params": len(opened),
                                            "time": time.time()})
            if C.REPLAY_FLAG in batch:
                seen["replay"] += int(batch[C.REPLAY_FLAG].sum())
                seen["rows"] += len(batch[C.REPLAY_FLAG])
            real, slots = T.token_counts(batch)  # padding_fraction: this rank's share stands for all
            seen["tokens"], seen["slots"] = seen["tokens"] + real, seen["slots"] + slots
            inputs = T.model_inputs(batch, attention)
            update = stepper.micro_step(lambda: model(**inputs).loss, real, penalty=ewc.penalty if ewc else None)
            if update is None:  # inside an accumulation window: no optimizer step yet
                continue
            penalty = update.penalty
            scheduler.step()
            step += 1
            loop.add(update.loss, update.count * loop.world)  # equal shares per rank
            loop.stepped(step)
            if loop.due(step):
                final, extra = loop.final(step), None
                record = loop.record(step, lr=scheduler.get_last_lr()[0], **loop.throughput(), **sized)
                if penalty is not None:
                    record["ewc_penalty"] = float(penalty.detach())
                if loop.rank == 0:
                    record.update({f"eval_{k}": v for k, v in C.evaluate(inner, eval_rows, spec).items()})
                if loop.rank == 0 and final:
                    record.update({f"retain_{k}": v for k, v in C.evaluate(inner, retain_rows, spec).items()})
                    record.update({f"eval_{k}": v for k, v in G.evaluate(inner, spec.model, data, generated).items()})
                    torch.save(C.probe(inner, spec.model), os.path.join(run_dir.path, "probe.pt"))
                    extra = {**before, "trainable_params": trainable, "total_params": total,
                             "rss_start_mb": round(rss_start, 1), "peak_rss_mb": round(S.peak_rss_mb(), 1),
                             "replay_share": seen["replay"] / seen["rows"] if seen["rows"] else None,
                             "padding_fraction": 1 - seen["tokens"] / seen["slots"] if seen["slots"] else None,
                             **_final_fields(inner, trained, optimizer, unfrozen_at, record)}
                loop.report(record, save=lambda path: save(path, final), extra=extra)
            if step >= train.max_steps:
                break


def _build(spec, steps_per_epoch: int, keep_base: str | None):
    """The base with its strategy, the unfreezing schedule, the set the optimizer may ever update
    (today's trainable set, or the schedule's final one), the optimizer and the EWC penalty.
    The same seed on every rank gives the same base weights; `keep_base`: save the base there."""
    base = C.build_model(spec.model, seed=spec.train.seed, dtype=P.base_dtype(spec))
    if keep_base:
        base.save_pretrained(keep_base)  # before the strategy wraps it
    model, strategy = C.apply_strategy(base, spec.strategy), spec.strategy
    if spec.init_adapter:
        S.load_adapter_weights(model, spec.init_adapter)
    P.trainable_in_fp32(model)
    if spec.train.grad_checkpointing:
        P.enable_checkpointing(model)
    unfreezer = S.Unfreezer(strategy, steps_per_epoch) if get_strategy(strategy).eventual else None
    trained = unfreezer.eventual(strategy, model) if unfreezer else {
        n for n, p in model.named_parameters() if p.requires_grad}
    groups = S.param_groups(model, spec.lr_groups, spec.train.lr, spec.mitigation.lr_cap,
                            only=trained)
    # Parameters without a gradient (not yet unfrozen) are skipped by AdamW: no update, no decay.
    optimizer = torch.optim.AdamW(groups, weight_decay=spec.train.weight_decay)
    ewc, e = None, spec.mitigation.ewc
    if e:
        # Fisher and anchor from the weights before any update (also on resume: they are a
        # deterministic function of the seeded base and the retain set).
        examples = C.example_batches(C.load_split(spec.data.retain, spec.data, e.samples), spec, e.samples)
        ewc = S.EWC(model, examples, e.lam, names=trained)
    return model, optimizer, trained, unfreezer, ewc


def _final_fields(model, trained: set, optimizer, unfrozen_at: dict, record: dict) -> dict:
    """What the driver's summary reads from the final report, beside the metrics record."""
    return {
        "digests_after": C.frozen_and_trainable_digests(model, trained),
        "lr_groups": [{"name": g["name"], "lr": g["lr"], "params": sum(p.numel() for p in g["params"])}
                      for g in optimizer.param_groups],
        "unfrozen_at": {str(k): len(v) for k, v in unfrozen_at.items() if v},
        "ewc_penalty_last": record.get("ewc_penalty"),
    }


def _prepare(model, eventual: set | None):
    """The model wrapped for data parallelism. DDP tracks the parameters that need gradients
    when it wraps the model; gradual unfreezing (`eventual`: all it will train) adds some later,
    so it wraps with all of them and lets DDP skip the still-frozen ones."""
    if eventual is None:
        return ray.train.torch.prepare_model(model)
    now = {n: p.requires_grad for n, p in model.named_parameters()}
    S.set_trainable(model, lambda n: n in eventual)
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    S.set_trainable(C.unwrap(model), lambda n: now[n])
    return model
