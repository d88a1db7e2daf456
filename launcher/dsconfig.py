"""The DeepSpeed config of a finetune spec: a pure function, so `plan` shows exactly what runs.

`prepare(spec)` lints the engine settings (every problem at once, each with its fix), fills the
defaults that depend on the hardware (`train.precision`), and returns the DeepSpeed JSON config.
Precision, accumulation and checkpointing come from `train:`, the same fields the torch engine reads.
"""

from __future__ import annotations

from typing import Optional

from launcher.errors import PlanError

ENGINE_STRATEGIES = ("full", "lora")  # what the DeepSpeed job knows how to build and export


def problems(spec: dict) -> list[str]:
    """Every reason this spec's engine settings cannot run, as one-line messages with the fix."""
    engine, ds = spec.get("engine", "torch"), spec.get("deepspeed")
    res = spec.get("resources", {})
    gpus = res.get("gpus_per_worker", 0)
    if engine != "deepspeed":
        if ds is not None:
            return ["deepspeed: a deepspeed block needs engine: deepspeed (or remove the block)"]
        return []
    ds = ds or {}
    found = []
    strategy = spec["strategy"]["type"]
    if strategy not in ENGINE_STRATEGIES:
        found.append(
            f"engine: deepspeed runs strategy full or lora, not {strategy!r}; "
            "use engine: torch for it, or strategy: full/lora"
        )
    stage = ds.get("zero_stage", 0)
    if ds.get("offload_optimizer") and stage == 0:
        found.append("deepspeed.offload_optimizer: needs ZeRO (zero_stage 1, 2 or 3); set deepspeed.zero_stage")
    if ds.get("offload_params") and stage != 3:
        found.append(f"deepspeed.offload_params: needs ZeRO-3, got zero_stage {stage}; set deepspeed.zero_stage=3")
    if gpus and gpus != int(gpus):
        found.append(
            f"resources.gpus_per_worker: {gpus} shares a GPU between DeepSpeed workers, which nccl "
            "refuses; use whole GPUs (gpus_per_worker: 1)"
        )
    return found


def prepare(spec: dict) -> Optional[dict]:
    """Lint, fill hardware defaults into `spec['deepspeed']` (in place), return the config.

    Returns None for engine torch. Raises PlanError listing every problem at once.
    """
    found = problems(spec)
    if found:
        raise PlanError("; ".join(found))
    if spec.get("engine", "torch") != "deepspeed":
        return None
    on_gpu = spec.get("resources", {}).get("gpus_per_worker", 0) > 0
    ds = dict(spec.get("deepspeed") or {})
    ds.setdefault("zero_stage", 0)
    ds.setdefault("offload_optimizer", False)
    ds.setdefault("offload_params", False)
    spec["deepspeed"] = ds
    train = spec.setdefault("train", {})
    if train.get("precision") is None:
        train["precision"] = "bf16" if on_gpu else "fp32"
    return ds_config(spec)


def ds_config(spec: dict, world_size: Optional[int] = None) -> dict:
    """The DeepSpeed JSON config for a prepared spec and a world size (default: resources.workers).

    The batch arithmetic always holds: train_batch_size = micro_batch x accumulation x world size.
    """
    ds, train = spec["deepspeed"], spec["train"]
    world = world_size or spec.get("resources", {}).get("workers", 1)
    micro, accum = train["micro_batch"], train.get("grad_accumulation", 1)
    precision = train.get("precision") or ("bf16" if spec.get("resources", {}).get("gpus_per_worker", 0) else "fp32")
    stage = ds["zero_stage"]
    offload = ds.get("offload_optimizer", False)
    config = {
        "train_batch_size": micro * accum * world,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": train.get("grad_clip") or 0.0,
        "steps_per_print": 10**9,  # the job reports its own metrics
        "wall_clock_breakdown": False,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": train["lr"],
                "weight_decay": train.get("weight_decay", 0.0),
                "betas": [0.9, 0.999],
                "eps": 1e-8,
                # torch's AdamW needs no compiled op; offload needs DeepSpeed's compiled CPU Adam.
                **({} if offload else {"torch_adam": True}),
            },
        },
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
    }
    if train.get("grad_checkpointing"):
        # The job turns on transformers' non-reentrant checkpointing (jobs/deepspeed_finetune.py);
        # this block records it in the config plan shows (DeepSpeed's own API is not used).
        config["activation_checkpointing"] = {"partition_activations": False, "contiguous_memory_optimization": False}
    if precision == "fp16":
        config["fp16"].update(loss_scale=0, initial_scale_power=16)
    if train.get("warmup_steps"):
        config["scheduler"] = {
            "type": "WarmupLR",
            "params": {
                "warmup_min_lr": 0.0,
                "warmup_max_lr": train["lr"],
                "warmup_num_steps": train["warmup_steps"],
                "warmup_type": "linear",
            },
        }
    zero = config["zero_optimization"]
    if stage >= 1 and offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if stage == 3:
        # Gather the whole model at save time, so rank 0 can also write 16-bit weights directly.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        if ds.get("offload_params"):
            zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    return config
