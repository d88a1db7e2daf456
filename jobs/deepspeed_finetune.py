"""`kind: finetune` with `engine: deepspeed`: full fine-tuning (or LoRA) under DeepSpeed ZeRO 0-3.

The story: read data -> Ray Train run (gloo + DS_ACCELERATOR=cpu on CPU, nccl on GPUs) -> (each
worker) build model, apply strategy, wrap it in a DeepSpeed engine from the plan's config, resume
from DeepSpeed's own checkpoint if Ray Train has one, train with periodic report + checkpoint
(every rank writes its ZeRO shard; Ray Train gathers them into one checkpoint) -> export the final
checkpoint to a plain transformers model (fp32 weights consolidated by zero_to_fp32) -> summary.
"""

from __future__ import annotations

import importlib
import os
import socket
import time

import torch

from common.runfolder import dir_size
from jobs import components as C
from jobs import generate as G
from jobs import text as T
from jobs.artifacts import RunDir
from jobs.data.badrows import BAD_ROWS_DIR, skipped_rows, train_guard
from jobs.data.ingest import Stream
from jobs.loop import Loop, run_worker
from jobs.precision import enable_checkpointing
from launcher.dsconfig import ds_config
from launcher.kinds.finetune import DeepSpeedSpec
from launcher.strategies import get_strategy

CKPT_TAG = "ds"  # one DeepSpeed tag per Ray checkpoint folder: each folder is self-contained


def run(spec, plan: dict, run_dir: RunDir) -> dict:
    from ray.train.torch import TorchConfig, TorchTrainer

    from jobs.finetune import train_dataset

    spec = with_engine_defaults(spec)
    data, train, res = spec.data, spec.train, spec.resources

    # 1. Data: the torch engine's stream (the model's own tokenizer, packed rows with
    # data.packing; no replay under DeepSpeed), split across the workers.
    train_ds, _ = train_dataset(spec, plan)

    # 2. The Ray Train run: DeepSpeed joins the process group Ray Train already set up.
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"spec": spec.model_dump(mode="json"), "run_dir": str(run_dir.path)},
        torch_config=TorchConfig(backend="nccl" if res.gpus_per_worker > 0 else "gloo"),
        datasets={"train": train_ds},
        **C.ray_train_configs(res, plan["run_id"], run_dir.ray_storage(), train.max_failures),
    )
    # Exact match of greedy answers (instruction and chat tasks): the workers hold ZeRO shards, so
    # the driver answers the eval prompts, with the base before training, the export after.
    pairs = G.eval_pairs(data.eval, data, train.eval_generate) if G.enabled(data, train) else []
    generated_before = _exact_match_before(spec, run_dir, pairs)
    started = time.time()
    with run_dir.progress(train.max_steps):
        result = trainer.fit()

    # 3. Export: the final DeepSpeed checkpoint becomes a plain transformers model (or adapter).
    export_name = get_strategy(spec.strategy).export
    target = run_dir.path / export_name
    with result.checkpoint.as_directory() as ckpt:
        model = export(ckpt, spec, str(target))
    if get_strategy(spec.strategy).is_adapter and spec.model.source in C.RANDOM_INIT_SOURCES:
        # A random-init base exists nowhere else: keep it beside the adapter (same seed, same weights).
        C.build_model(spec.model, seed=train.seed).save_pretrained(run_dir.path / "base")
    T.tokenizer_for(spec.model, spec.data).save_pretrained(run_dir.path / "tokenizer")  # with its chat template

    generated = {}
    if pairs:
        after = G.evaluate(model.eval(), spec.model, data, pairs)["exact_match"]
        before = generated_before["exact_match"]
        generated = {"eval_exact_match_before": before, "eval_exact_match_after": after,
                     "eval_exact_match_delta": after - before}
    metrics = run_dir.read_jsonl("metrics.jsonl")
    final = result.metrics or {}
    return {
        **generated,
        "engine": "deepspeed",
        "deepspeed": spec.deepspeed.model_dump(mode="json"),
        "precision": spec.train.precision,
        "wall_time_s": round(time.time() - started, 2),
        "steps": final.get("step"),
        "loss_first": metrics[0]["loss"] if metrics else None,
        "loss_last": metrics[-1]["loss"] if metrics else None,
        "eval_loss_before": final.get("eval_loss_before"),
        "eval_loss_after": final.get("eval_loss"),
        "retain_loss_before": final.get("retain_loss_before"),
        "retain_loss_after": final.get("retain_loss"),
        "padding_fraction": final.get("padding_fraction"),
        "trainable_params": final.get("trainable_params"),
        "total_params": final.get("total_params"),
        "digests_before": final.get("digests_before"),
        "digests_after": C.frozen_and_trainable_digests(model),
        "export": export_name,
        "export_bytes": dir_size(target),
        "bad_rows_skipped": skipped_rows(run_dir.path / BAD_ROWS_DIR),
        **{k: final[k] for k in C.SPLIT_SKIPS if k in final},
    }


def _exact_match_before(spec, run_dir: RunDir, pairs: list) -> dict:
    """The base model's exact match on the eval pairs, measured once (a resumed run reads the
    first attempt's from the manifest); {} without pairs."""
    if not pairs:
        return {}
    recorded = run_dir.read_manifest().get("generate_before")
    if recorded:
        return recorded
    before = G.evaluate(C.build_model(spec.model, seed=spec.train.seed).eval(), spec.model, spec.data, pairs)
    run_dir.update_manifest(generate_before=before)
    return before


def with_engine_defaults(spec):
    """The spec with its `deepspeed:` block complete and `train.precision` filled in from the
    hardware (bf16 on GPUs, fp32 on CPU), as `plan` fills them (a compare variant is not planned)."""
    train = spec.train
    if train.precision is None:
        train = train.model_copy(update={"precision": "bf16" if spec.resources.gpus_per_worker > 0 else "fp32"})
    return spec.model_copy(update={"deepspeed": spec.deepspeed or DeepSpeedSpec(), "train": train})


def train_loop(config: dict) -> None:
    run_worker(_train_loop, config)


def _train_loop(spec, config: dict) -> None:
    import ray.train

    run_dir, train, data = RunDir(config["run_dir"]), spec.train, spec.data
    ctx = ray.train.get_context()
    # Every rank writes its own ZeRO shard; Ray Train gathers them into one checkpoint.
    loop = Loop(run_dir, train.max_steps, train.report_every, rank=ctx.get_world_rank(),
                world=ctx.get_world_size(), every_rank_saves=True)
    torch.set_num_threads(max(1, int(spec.resources.cpus_per_worker)))
    # The data stream starts now: its first read overlaps the model build and the before-eval.
    stream = Stream(ray.train.get_dataset_shard("train"), train.micro_batch, spec.model.seq_len,
                    guard=train_guard(data, run_dir.path, loop.rank, C.read_columns(data)))

    dropped: dict = {}  # the eval and retain splits' bad rows skipped, by path
    eval_rows = C.load_split(data.eval, data, train.eval_batches * 16, dropped)
    retain_rows = C.load_split(data.retain, data, train.eval_batches * 16, dropped)

    # Model, strategy, engine. The "before" figures come from the plain model, before any update.
    model = build_model(spec)
    trainable, total = C.parameter_counts(model)
    resuming, before = loop.has_state(), {}
    if not resuming and loop.rank == 0:
        before = {
            "eval_loss_before": C.causal_lm_loss(model, eval_rows, spec),
            "retain_loss_before": C.causal_lm_loss(model, retain_rows, spec),
            "digests_before": C.frozen_and_trainable_digests(model),
            **C.split_skips(dropped, data),
        }
        run_dir.update_manifest(before=before)
    engine = build_engine(model, spec, loop.world)
    step = loop.resume(lambda path: load(engine, path))
    if resuming:
        before = run_dir.read_manifest().get("before", {})

    seen = {"tokens": 0, "slots": 0}
    engine.train()
    loop.begin()
    while step < train.max_steps:
        for batch in stream:
            real, slots = T.token_counts(batch)  # padding_fraction: this rank's share stands for all
            seen["tokens"], seen["slots"] = seen["tokens"] + real, seen["slots"] + slots
            loop.add(micro_step(engine, batch), real * loop.world)
            if engine.global_steps == step:  # inside an accumulation window: no update yet
                continue
            step = engine.global_steps
            loop.stepped(step)
            if loop.due(step):
                final, extra = loop.final(step), None
                record = loop.record(step, lr=engine.get_lr()[0], **loop.throughput())
                # Every rank evaluates: under ZeRO-3 a forward pass gathers shards collectively.
                record["eval_loss"] = C.causal_lm_loss(engine.module, eval_rows, spec)
                if final:
                    record["retain_loss"] = C.causal_lm_loss(engine.module, retain_rows, spec)
                    probe = C.probe(engine.module, spec.model)
                    if loop.rank == 0:
                        torch.save(probe, os.path.join(run_dir.path, "probe.pt"))
                    extra = {**before, "trainable_params": trainable, "total_params": total,
                             "padding_fraction": 1 - seen["tokens"] / seen["slots"] if seen["slots"] else None}
                loop.report(record, save=lambda path: save(engine, step, path), extra=extra)
            if step >= train.max_steps:
                break


# ---------------------------------------------------------------------------------------------
# The pieces, usable in-process too (tests run them with world size 1, no Ray).


def init_distributed(on_gpu: bool) -> None:
    """Join (or, outside Ray Train, create) the process group DeepSpeed runs on.

    DeepSpeed looks for mpi4py unless the rank variables are set; Ray Train sets them, and a
    single in-process run gets world size 1 here.
    """
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    import deepspeed

    if not on_gpu:
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce at start (90-190 s on a
        # fresh node); only inference_all_reduce uses it, training's collectives go through gloo.
        # (importlib: `import deepspeed.comm.torch as m` would bind the torch package itself.)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", verbose=False)


def build_model(spec):
    """The spec's base model with its strategy applied (same seed on every rank, same weights)."""
    model = C.apply_strategy(C.build_model(spec.model, seed=spec.train.seed), spec.strategy)
    if spec.train.grad_checkpointing:
        enable_checkpointing(model)
    return model


def build_engine(model, spec, world: int):
    """Wrap a model in a DeepSpeed engine built from the spec's generated config."""
    init_distributed(spec.resources.gpus_per_worker > 0)
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config(spec.model_dump(mode="json"), world),  # the pure function plan showed
    )
    return engine


def micro_step(engine, batch: dict) -> float:
    """One micro-batch: forward, backward; DeepSpeed steps the optimizer at accumulation boundaries."""
    inputs = T.model_inputs({k: v.to(engine.device) for k, v in batch.items()}, T.attention_of(engine.module))
    loss = engine(**inputs).loss
    engine.backward(loss)
    engine.step()
    return float(loss.detach().float())


def save(engine, step: int, path: str) -> None:
    """A DeepSpeed checkpoint into folder `path` (this rank's files; Ray Train merges all ranks')."""
    engine.save_checkpoint(path, tag=CKPT_TAG, client_state={"step": step})


def load(engine, path: str) -> int:
    """Restore weights, optimizer, scheduler and step from a DeepSpeed checkpoint folder."""
    loaded, client = engine.load_checkpoint(path, tag=CKPT_TAG)
    if loaded is None:
        raise RuntimeError(f"no DeepSpeed checkpoint with tag {CKPT_TAG!r} in {path}")
    return int(client["step"])


def export(ckpt_dir: str, spec, target: str):
    """Consolidate a DeepSpeed checkpoint into a plain transformers model (fp32) saved at target.

    ZeRO 1-3 go through DeepSpeed's zero_to_fp32 (the fp32 master weights, gathered from every
    rank's shard); ZeRO-0 keeps whole weights in its model-states file. Returns the model.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if spec.deepspeed.zero_stage > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=CKPT_TAG)
    else:
        files = os.path.join(ckpt_dir, CKPT_TAG, "mp_rank_00_model_states.pt")
        state = torch.load(files, map_location="cpu", weights_only=False)["module"]
    model = C.apply_strategy(C.build_model(spec.model, seed=spec.train.seed), spec.strategy)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    _check_complete(model, state)
    model.save_pretrained(target)
    return model


def _check_complete(model, state: dict) -> None:
    """Every trainable weight must come from the checkpoint (tied or buffers aside)."""
    wanted = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = wanted - set(state)
    if missing:
        raise RuntimeError(f"DeepSpeed checkpoint lacks trainable weights: {sorted(missing)[:3]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
