"""`kind: finetune`: one model, one strategy, data streamed through Ray Data into Ray Train.

The story: read data -> build the Ray Train run -> (each worker) build model, apply strategy,
resume if a checkpoint exists, train with periodic report + checkpoint -> export -> summary.
"""

from __future__ import annotations

import os
import shutil
import time

import ray
import ray.data
import ray.train
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from jobs import components as C
from jobs.artifacts import RunDir
from jobs.data.read import read_dataset


def run(plan: dict, run_dir: RunDir) -> dict:
    if plan["spec"].get("engine") == "deepspeed":  # its own story: jobs/deepspeed_finetune.py
        from jobs import deepspeed_finetune
        return deepspeed_finetune.run(plan, run_dir)
    spec = plan["spec"]
    data, train, res = spec["data"], spec["train"], spec["resources"]
    seq_len = spec["model"]["seq_len"]
    text = data["columns"].get("text", "text")

    # 1. Data: Parquet -> tokenized tensor columns, streamed and split across the workers.
    train_ds = read_dataset(data["train"], columns=[text]).map_batches(
        C.tokenize_causal, fn_kwargs={"column": text, "seq_len": seq_len},
        batch_format="numpy",
    )

    # 2. The Ray Train run. Its name is the run id: a rerun of the same id resumes on purpose.
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"spec": spec, "run_dir": str(run_dir.path)},
        scaling_config=ScalingConfig(
            num_workers=res["workers"],
            use_gpu=res["gpus_per_worker"] > 0,
            resources_per_worker={"CPU": res["cpus_per_worker"], "GPU": res["gpus_per_worker"]},
        ),
        run_config=RunConfig(
            name=plan["run_id"],
            storage_path=str(run_dir.path.parent),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=train.get("max_failures", 0)),
        ),
        datasets={"train": train_ds},
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
    C.tokenizer().save_pretrained(run_dir.path / "tokenizer")

    metrics = run_dir.read_jsonl("metrics.jsonl")
    final = result.metrics or {}
    return {
        "wall_time_s": round(time.time() - started, 2),
        "steps": final.get("step"),
        "loss_first": metrics[0]["loss"] if metrics else None,
        "loss_last": metrics[-1]["loss"] if metrics else None,
        "eval_loss_before": final.get("eval_loss_before"),
        "eval_loss_after": final.get("eval_loss"),
        "retain_loss_before": final.get("retain_loss_before"),
        "retain_loss_after": final.get("retain_loss"),
        "trainable_params": final.get("trainable_params"),
        "total_params": final.get("total_params"),
        "digests_before": final.get("digests_before"),
        "digests_after": final.get("digests_after"),
        "export": export_name,
        "export_bytes": C.dir_size(target),
    }


def train_loop(config: dict) -> None:
    with C.plain_errors():
        _train_loop(config)


def _train_loop(config: dict) -> None:
    spec, run_dir = config["spec"], RunDir(config["run_dir"])
    train, data, seq_len = spec["train"], spec["data"], spec["model"]["seq_len"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(spec["resources"]["cpus_per_worker"])))

    # Model and strategy: the same seed on every rank gives the same base weights.
    base = C.build_model(spec["model"], seed=train["seed"])
    checkpoint = ray.train.get_checkpoint()
    if rank == 0 and not checkpoint and spec["model"]["source"] in C.RANDOM_INIT_SOURCES:
        # A random-init base exists nowhere else: keep it beside the adapter, before LoRA wraps it.
        base.save_pretrained(os.path.join(run_dir.path, ".base-pending"))
    model = C.apply_strategy(base, spec["strategy"])
    trainable, total = C.parameter_counts(model)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=train["lr"], weight_decay=train["weight_decay"],
    )
    text = data["columns"].get("text", "text")
    eval_texts = C.eval_texts(data.get("eval"), text, train["eval_batches"] * 16)
    retain_texts = C.eval_texts(data.get("retain"), text, train["eval_batches"] * 16)

    step, before = 0, {}
    if checkpoint:
        step = C.load_checkpoint(model, optimizer, checkpoint)
        before = run_dir.read_manifest().get("before", {})
        if rank == 0:  # records past the checkpoint will be written again: keep none twice
            run_dir.truncate_jsonl("metrics.jsonl", lambda r: r["step"] <= step)
    elif rank == 0:
        # Measured once, before any update: the baseline for eval gain and forgetting.
        before = {
            "eval_loss_before": C.causal_lm_loss(model, eval_texts, seq_len),
            "retain_loss_before": C.causal_lm_loss(model, retain_texts, seq_len),
            "digests_before": C.frozen_and_trainable_digests(model),
        }
        run_dir.update_manifest(before=before)

    model = ray.train.torch.prepare_model(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / train["warmup_steps"]) if train["warmup_steps"] else 1.0
    )
    shard = ray.train.get_dataset_shard("train")
    tokens, window_tokens, window_start, run_start = 0, 0, time.time(), time.time()
    losses = []
    model.train()
    while step < train["max_steps"]:
        for batch in shard.iter_torch_batches(
            batch_size=train["micro_batch"], drop_last=True, dtypes=torch.long
        ):
            batch = {k: batch[k] for k in C.TENSOR_COLUMNS}
            loss = model(**batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
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
                now = time.time()
                record = {
                    "step": step,
                    "loss": sum(losses) / len(losses),
                    "lr": scheduler.get_last_lr()[0],
                    "tokens": tokens,
                    "tokens_per_s": window_tokens / max(now - window_start, 1e-9),
                    "elapsed_s": now - run_start,
                    "time": now,
                }
                final = step == train["max_steps"]
                if rank == 0:
                    inner = C.unwrap(model)
                    record["eval_loss"] = C.causal_lm_loss(inner, eval_texts, seq_len)
                    if final:
                        record["retain_loss"] = C.causal_lm_loss(inner, retain_texts, seq_len)
                    run_dir.append("metrics.jsonl", record)
                    ckpt_dir = C.save_checkpoint(model, optimizer, step, export=final)
                    if final:
                        pending = os.path.join(run_dir.path, ".base-pending")
                        if os.path.isdir(pending):
                            shutil.move(pending, os.path.join(ckpt_dir, "base"))
                        torch.save(C.probe(inner), os.path.join(run_dir.path, "probe.pt"))
                        record.update(before, trainable_params=trainable, total_params=total,
                                      digests_after=C.frozen_and_trainable_digests(inner))
                    ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(ckpt_dir))
                    shutil.rmtree(ckpt_dir, ignore_errors=True)
                else:
                    ray.train.report(record)
                losses, window_tokens, window_start = [], 0, time.time()
            if step >= train["max_steps"]:
                break
