"""The planner: exact parameter counts, memory per GPU, fit on a cluster profile (and what would
fit instead, as spec overrides), and time, for a spec before any GPU is asked for.

Client side: torch, transformers and peft are imported only inside the counting functions (the
model is built on the meta device: no weights, no GPU). Memory, fit and time work from the counts
alone, so alternatives are re-estimated without building a model again. One concern per module:
counts, memory, fit, timing, describe, arrcoc (kind: pipeline) and claims (the design document's).
"""

from __future__ import annotations

import math
from typing import Optional

from cluster import profiles as cluster_profiles
from launcher.planner.arrcoc import arrcoc_counts, estimate_pipeline
from launcher.planner.counts import count_parameters, lora_closed_form, lora_counts
from launcher.planner.describe import format_estimate, format_pipeline_estimate
from launcher.planner.fit import USABLE_FRACTION, Levers, capacity, fit, schedule_problem, suggestions
from launcher.planner.memory import GB, GIB, QLORA_BITS, activation_terms, memory_per_gpu
from launcher.planner.timing import DEFAULT_MFU, time_estimate
from launcher.strategies import get_strategy

__all__ = [
    "DEFAULT_MFU", "GB", "GIB", "QLORA_BITS", "USABLE_FRACTION", "Levers",
    "activation_terms", "arrcoc_counts", "capacity", "count_parameters", "estimate", "estimate_pipeline",
    "fit", "format_estimate", "format_pipeline_estimate", "lora_closed_form", "lora_counts",
    "memory_per_gpu", "schedule_problem", "suggestions", "time_estimate",
]


def estimate(spec: dict, profile_name: Optional[str] = None) -> dict:
    """Parameters, memory, fit and time for a finetune spec dict (FinetuneSpec.model_dump(mode="json"))."""
    model, strategy = spec.get("model", {}), spec["strategy"]
    train, res = spec.get("train", {}), spec.get("resources", {})
    engine = spec.get("engine", "torch")
    ds = spec.get("deepspeed") or {}
    resources = {
        "workers": res.get("workers", 1),
        "cpus_per_worker": res.get("cpus_per_worker", 1),
        "gpus_per_worker": res.get("gpus_per_worker", 0),
    }
    on_gpu = resources["gpus_per_worker"] > 0
    profile = cluster_profiles.get_profile(profile_name or ("local-cpu" if not on_gpu else "a100-80g-1"))
    counts = count_parameters(model, strategy)
    if strategy["type"] in ("lora", "qlora"):
        counts["lora_r"] = strategy.get("r", 8)
        counts["lora_dropout"] = strategy.get("dropout", 0.0)
        counts["lora_targets"] = strategy.get("target_modules", "all-linear")
    seq_len = model.get("seq_len", 64)
    micro_batch, workers = train.get("micro_batch", 8), resources["workers"]
    accumulation = train.get("grad_accumulation", 1)
    # What the job runs (jobs/precision.py): train.precision (bf16 on GPUs, fp32 on CPU by default),
    # train.grad_checkpointing, on either engine; the attention kernel of model.attn_implementation.
    grad_ckpt = bool(train.get("grad_checkpointing"))
    precision = train.get("precision") or ("bf16" if on_gpu else "fp32")
    if (model.get("config") or {}).get("attn_implementation") is None and model.get("attn_implementation"):
        counts["dims"] = {**counts["dims"], "attn_implementation": model["attn_implementation"]}
    memory = memory_per_gpu(
        counts,
        None,
        strategy["type"],
        workers=workers,
        micro_batch=micro_batch,
        seq_len=seq_len,
        zero_stage=ds.get("zero_stage", 0),
        offload_optimizer=ds.get("offload_optimizer", False),
        offload_params=ds.get("offload_params", False),
        precision=precision,
        grad_checkpointing=grad_ckpt,
        virtual_tokens=strategy.get("num_virtual_tokens", 0) if strategy["type"] == "prompt" else 0,
        on_gpu=on_gpu,
        autocast=engine != "deepspeed",
        base_16bit=on_gpu and precision != "fp32" and get_strategy(strategy).is_adapter and engine != "deepspeed",
        accumulation=accumulation,
    )
    # max_steps counts optimizer steps: each takes micro_batch x accumulation rows on every worker.
    effective_batch = micro_batch * accumulation * workers
    tokens = train.get("max_steps", 100) * effective_batch * seq_len
    devices = max(1, math.ceil(workers * resources["gpus_per_worker"])) if on_gpu else max(
        1, math.ceil(workers * resources["cpus_per_worker"]))
    if not on_gpu and profile["gpus"]:
        profile_for_time = {**cluster_profiles.get_profile("local-cpu"), "cpus": profile["cpus"],
                            "name": profile["name"]}
    else:
        profile_for_time = profile
    if on_gpu and not profile["gpus"]:
        timing = None  # cannot run there; the fit says why
    else:
        timing = time_estimate(counts, tokens, profile_for_time, strategy["type"], devices=devices,
                               grad_checkpointing=grad_ckpt, steps=train.get("max_steps", 100))
    public_counts = {k: v for k, v in counts.items() if k not in ("linear_shapes",)}
    return {
        "model": model.get("source", "tiny-llama"),
        "strategy": strategy["type"],
        "profile": profile["name"],
        "resources": resources,
        "parameters": public_counts,
        "memory": {k: v for k, v in memory.items() if k != "inputs"},
        "memory_settings": {**{k: v for k, v in memory["inputs"].items() if k != "counts"},
                            "grad_accumulation": accumulation, "effective_batch": effective_batch},
        "fit": fit(memory, profile, resources, Levers(engine=engine, strategy=strategy)),
        "time": timing,
    }
