"""Time and GPU-hours of a job: training FLOPs over the devices' peak at an assumed utilisation."""

from __future__ import annotations

from typing import Optional, Union

from cluster import profiles as cluster_profiles

DEFAULT_MFU = 0.4


def time_estimate(
    counts: dict,
    tokens: int,
    profile: Union[str, dict],
    strategy_type: str,
    mfu: float = DEFAULT_MFU,
    *,
    devices: Optional[int] = None,
    grad_checkpointing: bool = False,
    steps: Optional[int] = None,
) -> dict:
    """Seconds and GPU-hours: FLOPs (6Ψ per token, ~4Ψ with frozen base weights) / (peak x MFU x GPUs)."""
    profile = cluster_profiles.get_profile(profile) if isinstance(profile, str) else profile
    total, trainable = counts["total"], counts["trainable"]
    # forward 2Ψ + backward to activations 2Ψ + backward to weights 2Ψ_trainable
    per_token = 4 * total + 2 * trainable + (2 * total if grad_checkpointing else 0)
    flops = per_token * tokens
    on_gpu = bool(profile["gpus"])
    if on_gpu:
        devices = devices or cluster_profiles.total_gpus(profile)
        peak = profile["peak_bf16_tflops"] * 1e12
    else:
        devices = devices or profile["cpus"]
        peak = profile["peak_tflops_per_cpu"] * 1e12
    seconds = flops / (peak * mfu * devices)
    label = (f"{devices} GPU(s) at {peak / 1e12:g} TFLOP/s bf16 peak" if on_gpu else
             f"{devices} CPU core(s) at {peak / 1e12:g} TFLOP/s each (a rough peak)")
    return {
        "seconds_per_step": seconds / steps if steps else None,  # one optimizer step, every micro-batch
        "flops": float(flops),
        "tokens": int(tokens),
        "seconds": seconds,
        "gpu_hours": seconds * devices / 3600 if on_gpu else 0.0,
        "device_hours": seconds * devices / 3600,
        "devices": devices,
        "mfu": mfu,
        "assumptions": [
            f"FLOPs = (4*params + 2*trainable{' + 2*params recompute' if grad_checkpointing else ''}) "
            f"per token = {per_token / total:.2f}*params; "
            + ("full fine-tuning 6*params" if strategy_type == "full" else
               "frozen base weights need no weight gradients"),
            f"model FLOPs utilisation {mfu:.0%} of {label} (assumed, not measured)",
        ],
    }
