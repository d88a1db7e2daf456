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

from common.runfolder import dir_size
from jobs import components as C
from jobs import strategies as S
from jobs.artifacts import RunDir
from jobs.data.read import read_dataset


def run(plan: dict, run_dir: RunDir) -> dict:
    if plan["spec"].get("engine") == "deepspeed":  # its own story: jobs/deepspeed_finetune.py
        from jobs import deepspeed_finetune
        return deepspeed_finetune.run(plan, run_dir)
    spec = plan["spec"]
    data, train, res = spec["data"], spec["train"], spec["resources"]

    # 1. Data: Parquet -> tokenized tensor columns, streamed and split across the workers.
    tokenize, kwargs = C.tokenize_fn(spec)
    columns = [kwargs["column"]] + ([kwargs["label"]] if "label" in kwargs else [])

    def read(path, replayed=0):
        ds = read_dataset(path, columns=columns).map_batches(
            tokenize, fn_kwargs=kwargs, batch_format="numpy")
        if not data.get("replay"):
            return ds
        # Mixing is per block: blocks of one micro-batch keep the replay share even over a few
        # steps. Every row says where it came from: the workers count the share they saw.
        ds = ds.map_batches(C.flag_rows, fn_kwargs={"value": replayed}, batch_format="numpy")
        return ds.repartition(target_num_rows_per_block=train["micro_batch"])

    train_ds = read(data["train"])
    rows = {role: info.get("rows") for role, info in (plan.get("data") or {}).items()}
    stream_rows = rows.get("train")
    if data.get("replay"):
        # Replay: old-task rows interleaved at `fraction` of the stream (DESIGN: 80% new / 20% old).
        from jobs.data.mix import mix_datasets

        fraction = data["replay"]["fraction"]
        train_ds = mix_datasets(train_ds, read(data["replay"]["path"], 1), fraction,
                                seed=train["seed"], new_rows=rows.get("train"), old_rows=rows.get("replay"))
        stream_rows = stream_rows and stream_rows / (1 - fraction)
    # Epochs of the unfreezing schedule in steps: each step takes micro_batch rows per worker.
    steps_per_epoch = (max(1, int(stream_rows // (train["micro_batch"] * res["workers"])))
                       if stream_rows else train["max_steps"])

    # 2. The Ray Train run. Its name is the run id: a rerun of the same id resumes on purpose.
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"spec": spec, "run_dir": str(run_dir.path), "steps_per_epoch": steps_per_epoch},
        datasets={"train": train_ds},
        **C.ray_train_configs(res, plan["run_id"], str(run_dir.path.parent), train.get("max_failures", 0)),
    )
    started = time.time()
    with run_dir.progress(train["max_steps"]):
        result = trainer.fit()

    # 3. Export: the final checkpoint's adapter (or model) becomes the run's artifact.
    export_name = "adapter" if spec["strategy"]["type"] != "full" else "model"
    target = run_dir.path / export_name
    with result.checkpoint.as_directory() as ckpt:
        shutil.copytree(os.path.join(ckpt, "export"), target, dirs_exist_ok=True)
        base = os.path.join(ckpt, "base")
        if os.path.isdir(base):
            shutil.copytree(base, run_dir.path / "base", dirs_exist_ok=True)
    C.tokenizer_for(spec["model"]).save_pretrained(run_dir.path / "tokenizer")

    metrics = run_dir.read_jsonl("metrics.jsonl")
    final = result.metrics or {}
    summary = {
        "wall_time_s": round(time.time() - started, 2),
        "steps": final.get("step"),
        "strategy": spec["strategy"]["type"],
        "loss_first": metrics[0]["loss"] if metrics else None,
        "loss_last": metrics[-1]["loss"] if metrics else None,
    }
    # Before/after on the eval split and on the retain split (forgetting): loss, and accuracy
    # for classification; the deltas are after - before (a positive retain loss delta = forgetting).
    for split in ("eval", "retain"):
        for metric in ("loss", "accuracy"):
            before, after = final.get(f"{split}_{metric}_before"), final.get(f"{split}_{metric}")
            if metric == "loss" or before is not None:
                summary[f"{split}_{metric}_before"], summary[f"{split}_{metric}_after"] = before, after
            if before is not None and after is not None:
                summary[f"{split}_{metric}_delta"] = after - before
    summary.update({k: final.get(k) for k in (
        "trainable_params", "total_params", "digests_before", "digests_after", "lr_groups",
        "unfrozen_at", "ewc_penalty_last", "replay_share", "rss_start_mb", "peak_rss_mb")})
    summary.update(export=export_name, export_bytes=dir_size(target))
    return summary


def train_loop(config: dict) -> None:
    C.quiet_ray_train()
    with C.worker_scope(config["spec"], config["run_dir"]):
        _train_loop(config)


def _train_loop(config: dict) -> None:
    spec, run_dir = config["spec"], RunDir(config["run_dir"])
    train, data, strategy = spec["train"], spec["data"], spec["strategy"]
    mitigation = spec.get("mitigation") or {}
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(spec["resources"]["cpus_per_worker"])))
    rss_start = S.rss_mb()

    # Model and strategy: the same seed on every rank gives the same base weights.
    base = C.build_model(spec["model"], seed=train["seed"])
    checkpoint = ray.train.get_checkpoint()
    if rank == 0 and not checkpoint and spec["model"]["source"] in C.RANDOM_INIT_SOURCES:
        # A random-init base exists nowhere else: keep it beside the adapter, before LoRA wraps it.
        base.save_pretrained(os.path.join(run_dir.path, ".base-pending"))
    model = C.apply_strategy(base, strategy)
    unfreezer = None
    if strategy["type"] == "gradual_unfreeze":
        unfreezer = S.Unfreezer(strategy, config["steps_per_epoch"])
    # What the optimizer may ever update: today's trainable set, or the schedule's final one.
    trained = unfreezer.eventual(strategy, model) if unfreezer else {
        n for n, p in model.named_parameters() if p.requires_grad}
    trainable, total = C.parameter_counts(model)
    groups = S.param_groups(model, spec.get("lr_groups"), train["lr"], mitigation.get("lr_cap"), only=trained)
    # Parameters without a gradient (not yet unfrozen) are skipped by AdamW: no update, no decay.
    optimizer = torch.optim.AdamW(groups, weight_decay=train["weight_decay"])
    eval_rows = C.load_split(data.get("eval"), data, train["eval_batches"] * 16)
    retain_rows = C.load_split(data.get("retain"), data, train["eval_batches"] * 16)

    ewc = None
    if mitigation.get("ewc"):
        # Fisher and anchor from the weights before any update (also on resume: they are a
        # deterministic function of the seeded base and the retain set).
        e = mitigation["ewc"]
        examples = C.example_batches(C.load_split(data["retain"], data, e["samples"]), spec, e["samples"])
        ewc = S.EWC(model, examples, e["lambda"], names=trained)

    step, before = 0, {}
    if checkpoint:
        step = C.load_checkpoint(model, optimizer, checkpoint)
        before = run_dir.read_manifest().get("before", {})
        if rank == 0:  # records past the checkpoint will be written again: keep none twice
            run_dir.truncate_jsonl("metrics.jsonl", lambda r: r["step"] <= step)
    elif rank == 0:
        # Measured once, before any update: the baseline for eval gain and forgetting.
        before = {f"{split}_{k}_before": v for split, rows in (("eval", eval_rows), ("retain", retain_rows))
                  for k, v in C.evaluate(model, rows, spec).items()}
        before["digests_before"] = C.frozen_and_trainable_digests(model, trained)
        run_dir.update_manifest(before=before)
    unfrozen_at = {}
    if unfreezer:
        for name in unfreezer.at(model, step):  # on resume: the groups already open by then
            unfrozen_at.setdefault(step, []).append(name)

    # DDP tracks the parameters that need gradients when it wraps the model; gradual unfreezing
    # adds some later, so it wraps with all of them and lets DDP skip the still-frozen ones.
    ddp_kwargs = {"find_unused_parameters": True} if unfreezer else None
    if unfreezer:
        now = {n: p.requires_grad for n, p in model.named_parameters()}
        S.set_trainable(model, lambda n: n in trained)
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=ddp_kwargs)
    if unfreezer:
        S.set_trainable(C.unwrap(model), lambda n: now[n])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / train["warmup_steps"]) if train["warmup_steps"] else 1.0
    )
    shard = ray.train.get_dataset_shard("train")
    tokens, window_tokens, window_start, run_start = 0, 0, time.time(), time.time()
    losses, penalty, seen = [], None, {"replay": 0, "rows": 0}
    model.train()
    while step < train["max_steps"]:
        for batch in shard.iter_torch_batches(
            batch_size=train["micro_batch"], drop_last=True, dtypes=torch.long
        ):
            if unfreezer:
                opened = unfreezer.at(C.unwrap(model), step)
                if opened:
                    unfrozen_at[step] = opened
                    if rank == 0:
                        run_dir.append("events.jsonl", {"event": "unfreeze", "step": step,
                                                        "params": len(opened), "time": time.time()})
            if C.REPLAY_FLAG in batch:
                seen["replay"] += int(batch[C.REPLAY_FLAG].sum())
                seen["rows"] += len(batch[C.REPLAY_FLAG])
            batch = {k: batch[k] for k in C.TENSOR_COLUMNS}
            loss = model(**batch).loss
            objective = loss
            if ewc:
                penalty = ewc.penalty()
                objective = loss + penalty
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            if train["grad_clip"]:
                torch.nn.utils.clip_grad_norm_(
                    [p for p in model.parameters() if p.requires_grad], train["grad_clip"]
                )
            optimizer.step()
            scheduler.step()
            step += 1
            n = int(batch["attention_mask"].sum()) * world  # every rank sees an equal share
            tokens += n
            window_tokens += n
            losses.append(float(loss.detach()))
            if step == 1 and rank == 0:
                run_dir.append("events.jsonl", {"event": "first_step", "time": time.time()})
            if step % train["report_every"] == 0 or step == train["max_steps"]:
                now_t = time.time()
                record = {
                    "step": step,
                    "loss": sum(losses) / len(losses),
                    "lr": scheduler.get_last_lr()[0],
                    "tokens": tokens,
                    "tokens_per_s": window_tokens / max(now_t - window_start, 1e-9),
                    "elapsed_s": now_t - run_start,
                    "time": now_t,
                }
                if penalty is not None:
                    record["ewc_penalty"] = float(penalty.detach())
                final = step == train["max_steps"]
                if rank == 0:
                    inner = C.unwrap(model)
                    ev = C.evaluate(inner, eval_rows, spec)
                    record.update({f"eval_{k}": v for k, v in ev.items()})
                    if final:
                        record.update({f"retain_{k}": v for k, v in C.evaluate(inner, retain_rows, spec).items()})
                    run_dir.append("metrics.jsonl", record)
                    ckpt_dir = C.save_checkpoint(model, optimizer, step, export=final)
                    if final:
                        pending = os.path.join(run_dir.path, ".base-pending")
                        if os.path.isdir(pending):
                            shutil.move(pending, os.path.join(ckpt_dir, "base"))
                        torch.save(C.probe(inner, spec["model"]), os.path.join(run_dir.path, "probe.pt"))
                        record.update(
                            before, trainable_params=trainable, total_params=total,
                            digests_after=C.frozen_and_trainable_digests(inner, trained),
                            lr_groups=[{"name": g["name"], "lr": g["lr"],
                                        "params": sum(p.numel() for p in g["params"])}
                                       for g in optimizer.param_groups],
                            unfrozen_at={str(k): len(v) for k, v in unfrozen_at.items()},
                            ewc_penalty_last=record.get("ewc_penalty"),
                            replay_share=seen["replay"] / seen["rows"] if seen["rows"] else None,
                            rss_start_mb=round(rss_start, 1), peak_rss_mb=round(S.peak_rss_mb(), 1),
                        )
                    ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(ckpt_dir))
                    shutil.rmtree(ckpt_dir, ignore_errors=True)
                else:
                    ray.train.report(record)
                losses, window_tokens, window_start = [], 0, time.time()
            if step >= train["max_steps"]:
                break
