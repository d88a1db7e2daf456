"""`kind: pipeline`: the ARR-COC stages run one after another, each a Ray Train run that starts
from the previous stage's checkpoint.

The story: read pipeline.json -> for each stage not yet SUCCEEDED: stream the VQA data through the
texture transform -> TorchTrainer `<run_id>-<stage>` in the run folder (a rerun of the same name
resumes from its last checkpoint) -> (worker) build the model, load the previous stage's state,
train the declared groups with their learning rates, report + checkpoint -> save the stage's
state under stages/<stage>/ -> record it in pipeline.json. `ftlaunch resume RUN` reruns this with
the same run id: finished stages are skipped, the interrupted one continues from its checkpoint.
"""

from __future__ import annotations

import os
import time

import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer

from common.catalog import arrcoc_config
from common.runfolder import PIPELINE as MANIFEST
from common.runfolder import read_json, write_json
from jobs import arrcoc as A
from jobs.artifacts import RunDir
from jobs.components import ray_train_configs
from jobs.data.badrows import named_failures
from jobs.data.read import read_dataset, stream_tasks, task_args
from jobs.loop import Loop, run_worker
from jobs.watch import on_give_up


def read_manifest(run_dir: RunDir) -> dict:
    return read_json(run_dir.path / MANIFEST)


def write_manifest(run_dir: RunDir, manifest: dict) -> None:
    write_json(run_dir.path / MANIFEST, manifest)  # atomic: a stop mid-write loses nothing


def run(spec, plan: dict, run_dir: RunDir) -> dict:
    stages = spec.stages
    manifest = read_manifest(run_dir) or {
        "run_id": plan["run_id"],
        "stages": [{"name": s.name, "status": "PENDING", "checkpoint": None} for s in stages],
    }
    started, previous = time.time(), None
    for i, stage in enumerate(stages):
        entry = manifest["stages"][i]
        if entry["status"] == "SUCCEEDED":
            print(f"[ftlaunch] stage {stage.name}: already SUCCEEDED, skipped", flush=True)
            previous = entry["checkpoint"]
            continue
        entry.update(status="RUNNING", attempts=entry.get("attempts", 0) + 1, started=entry.get("started", time.time()))
        write_manifest(run_dir, manifest)
        print(f"[ftlaunch] stage {i + 1}/{len(stages)} {stage.name}: trains {', '.join(stage.train)}", flush=True)

        def end_stage(status, reason, entry=entry):  # by its error, or by a watch that ends the driver
            entry.update(status=status, error=reason)
            write_manifest(run_dir, manifest)

        try:
            with on_give_up(end_stage):
                result = run_stage(spec, plan, run_dir, i, previous)
        except BaseException as exc:
            from jobs.run import failure_line

            stopped = isinstance(exc, (KeyboardInterrupt, SystemExit))
            end_stage("STOPPED" if stopped else "FAILED", failure_line(exc))
            raise
        # The stage's hand-on: its carried weights, out of Ray Train's folder into a stable place.
        target = run_dir.path / "stages" / stage.name
        target.mkdir(parents=True, exist_ok=True)
        with result.checkpoint.as_directory() as ckpt:
            weights = torch.load(os.path.join(ckpt, "state.pt"), weights_only=False)["weights"]
        torch.save(weights, target / ".state.pt.tmp")
        os.replace(target / ".state.pt.tmp", target / "state.pt")
        final = result.metrics or {}
        before = final.get("before", {})
        entry.update(
            status="SUCCEEDED", finished=time.time(), checkpoint=str(target / "state.pt"), steps=final.get("step"),
            accuracy_before=before.get("accuracy"), accuracy_after=final.get("accuracy"),
            accuracy_random_before=before.get("accuracy_random"), accuracy_random_after=final.get("accuracy_random"),
            loss_first=before.get("loss_first"), loss_last=final.get("loss"),
            digests_before=before.get("digests"), digests_after=final.get("digests"),
            trainable_params=final.get("trainable_params"), total_params=final.get("total_params"),
        )
        write_manifest(run_dir, manifest)
        previous = entry["checkpoint"]

    done = manifest["stages"]
    return {
        "wall_time_s": round(time.time() - started, 2),
        "stages": {e["name"]: {k: e.get(k) for k in ("steps", "accuracy_before", "accuracy_after",
                                                     "accuracy_random_after", "loss_last", "trainable_params")}
                   for e in done},
        "steps": sum(e.get("steps") or 0 for e in done),
        "accuracy_before": done[0].get("accuracy_before"),
        "accuracy_after": done[-1].get("accuracy_after"),
        # The control: the same weights keeping K random patches instead of the adapter's choice.
        "accuracy_random_before": done[0].get("accuracy_random_before"),
        "accuracy_random_after": done[-1].get("accuracy_random_after"),
        "total_params": done[-1].get("total_params"),
        "trainable_params": max(e.get("trainable_params") or 0 for e in done),
        "export": "stages",
        "export_bytes": sum(f.stat().st_size for f in (run_dir.path / "stages").rglob("*") if f.is_file()),
    }


def stage_dataset(spec, index: int):
    """A stage's train split as model rows; the texture array is computed as the rows stream to
    the worker, never stored."""
    stage = spec.stages[index]
    data, tasks = stage.data or spec.data, stream_tasks(stage.resources)
    cfg = arrcoc_config(spec.model.model_dump())
    return read_dataset(data.train, columns=["image", "question", "answer"], tasks=tasks).map_batches(
        A.vqa_batch, fn_kwargs={"grid": cfg["grid"], "q_len": spec.model.seq_len, "answer_len": cfg["answer_len"]},
        batch_format="numpy", **task_args(tasks),
    )


def run_stage(spec, plan: dict, run_dir: RunDir, index: int, previous: str | None):
    stage = spec.stages[index]
    res = stage.resources
    trainer = TorchTrainer(
        stage_loop,
        train_loop_config={"spec": spec.model_dump(mode="json"), "index": index, "previous": previous,
                           "run_dir": str(run_dir.path)},
        datasets={"train": stage_dataset(spec, index)},
        # Same name and storage on a rerun: Ray Train resumes the stage from its last checkpoint.
        **ray_train_configs(res, f"{plan['run_id']}-{stage.name}", run_dir.ray_storage(inside=True),
                            spec.train.max_failures),
    )
    with run_dir.progress(stage.steps, unit="rows/s"):  # a stage's throughput is in rows
        return trainer.fit()


def stage_loop(config: dict) -> None:
    run_worker(_stage_loop, config)


def _stage_loop(spec, config: dict) -> None:
    index, run_dir = config["index"], RunDir(config["run_dir"])
    stage, train = spec.stages[index], spec.train
    ctx = ray.train.get_context()
    loop = Loop(run_dir, stage.steps, stage.report_every, fields={"stage": stage.name},
                rank=ctx.get_world_rank(), world=ctx.get_world_size())
    torch.set_num_threads(max(1, int(stage.resources.cpus_per_worker)))
    data = stage.data or spec.data

    # Model: the same seed everywhere gives the same frozen vision tower and LLM in every stage.
    model = A.build(spec.model.model_dump(), A.pipeline_lora(spec.stages), seed=train.seed)
    carried = {g for s in spec.stages for g in s.train}  # what any stage changes is handed on
    if config["previous"]:
        A.load_state(model, torch.load(config["previous"], weights_only=True))
    A.set_trainable(model, stage.train)
    optimizer = A.optimizer_for(model, stage.lr_groups, train.weight_decay)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    evals = A.load_eval(data.eval, model.cfg, spec.model.seq_len, train.eval_rows)

    before = {}

    def load(path):  # resumed mid-stage: weights, optimizer and step from the stage's own checkpoint
        state = torch.load(os.path.join(path, "state.pt"), weights_only=False)
        A.load_state(model, state["weights"])
        optimizer.load_state_dict(state["optimizer"])
        before.update(state["before"])
        return state["step"]

    step = loop.resume(load)
    if not step:
        before.update(accuracy=A.accuracy(model, evals), accuracy_random=A.accuracy(model, evals, selection="random"),
                      digests=A.group_digests(model))

    model = ray.train.torch.prepare_model(model) if loop.world > 1 else model
    inner = model.module if hasattr(model, "module") else model

    def save(path):
        torch.save({"weights": A.carried_state(inner, carried), "optimizer": optimizer.state_dict(),
                    "step": step, "before": before}, os.path.join(path, "state.pt"))

    shard = ray.train.get_dataset_shard("train")
    model.train()
    loop.begin()
    while step < stage.steps:
        batches = shard.iter_torch_batches(batch_size=stage.micro_batch, drop_last=True, dtypes=None)
        for batch in named_failures(batches, data, ["image", "question", "answer"]):
            loss = A.train_step(model, optimizer, {k: batch[k] for k in A.TENSOR_COLUMNS}, train.grad_clip)
            loop.add(loss, stage.micro_batch)  # its throughput is in rows
            step += 1
            before.setdefault("loss_first", loss)
            if loop.due(step):
                record = loop.record(step, tokens_per_s=loop.rate())
                if loop.final(step):
                    record.update(accuracy=A.accuracy(inner, evals),
                                  accuracy_random=A.accuracy(inner, evals, selection="random"),
                                  digests=A.group_digests(inner),
                                  trainable_params=trainable, total_params=total)
                loop.report(record, save=save, extra={"before": before} if loop.final(step) else None)
            if step >= stage.steps:
                break
