"""The design document's memory and size claims, answered by the planner (`ftlaunch claims`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from common.units import gib, size
from launcher.planner.counts import count_parameters, lora_closed_form, lora_counts
from launcher.planner.memory import GB, memory_per_gpu

LLAMA_7B_MODEL = {"source": "llama-2-7b", "config": {}, "seq_len": 512, "num_labels": None}
# The shipped full-size ARR-COC spec: its stages are what the ARR-COC claim is checked against.
ARRCOC_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "arrcoc" / "full.yaml"


def claims() -> list[dict]:
    """The seed's memory and size claims against the planner's figures, each with a verdict."""
    full = count_parameters(LLAMA_7B_MODEL, {"type": "full"})
    lora32 = count_parameters(LLAMA_7B_MODEL, {"type": "lora", "r": 32, "target_modules": "all-linear"})
    lora8 = lora_counts(full, 8)
    psi = full["total"]
    out = []

    states = memory_per_gpu(full, None, "full", workers=1, micro_batch=1, seq_len=512)
    ds = memory_per_gpu(full, None, "full", workers=1, micro_batch=1, seq_len=512, zero_stage=2)
    out.append(_claim(
        "7B full fine-tuning needs 64 GB", 64 * GB, states["model_states"],
        f"Llama-2-7B ({psi:,} params) x 16 B (bf16 weights, grads, fp32 master + Adam m, v) = "
        f"{gib(states['model_states'])} of model states before activations (the claim: {gib(64 * GB)}); "
        f"DeepSpeed ZeRO-2 on one GPU (fp32 grad copy too) {gib(ds['model_states'])}",
    ))

    q = lora_counts(full, 16, "qlora")
    qmem = memory_per_gpu(q, None, "qlora", workers=1, micro_batch=1, seq_len=512, grad_checkpointing=True)
    qmem_nockpt = memory_per_gpu(q, None, "qlora", workers=1, micro_batch=1, seq_len=512)
    out.append(_claim(
        "QLoRA on a 7B model needs 6 GB", 6 * GB, qmem["total"],
        f"Llama-2-7B 4-bit (double quant) + LoRA r=16 all-linear, micro_batch 1, seq_len 512 with gradient "
        f"checkpointing: {gib(qmem['total'])}; without checkpointing {gib(qmem_nockpt['total'])} "
        f"(the claim: {gib(6 * GB)})",
    ))

    out.append(_arrcoc_claim())

    for counts, r in ((lora8, 8), (lora32, 32)):
        size16, size32 = counts["trainable"] * 2, counts["trainable"] * 4
        qv = lora_closed_form([(f"x.{n}", i, o) for n, i, o, c in full["linear_shapes"] for _ in range(c)], r,
                              ["q_proj", "v_proj"])
        verdict = "holds" if 10 * 10**6 <= size16 <= 50 * 10**6 else "does-not-hold"
        out.append({
            "claim": f"a LoRA r={r} adapter file is 10-50 MB",
            "claimed_bytes": 50 * 10**6,
            "planner_bytes": size16,
            "verdict": verdict,
            "detail": f"Llama-2-7B all-linear r={r}: {counts['trainable']:,} params = "
                      f"{size(size16)} bf16, {size(size32)} fp32 (q_proj,v_proj only: {size(qv * 2)} bf16; "
                      f"the claim: {size(10 * 10**6)} to {size(50 * 10**6)})",
        })

    pct = lora32["percent_trainable"]
    out.append({
        "claim": "LoRA r=32 on a 7B LLM = 224M trainable, 3.2%",
        "claimed_bytes": None,
        "planner_bytes": None,
        "verdict": "holds" if abs(lora32["trainable"] - 224_000_000) < 5_000_000 else "does-not-hold",
        "detail": f"Llama-2-7B all-linear r=32: {lora32['trainable']:,} trainable, {pct:.2f}% of the base "
                  f"(peft count; closed form {lora32['lora_closed_form']:,})",
    })
    return out


def _arrcoc_claim() -> dict:
    """The ARR-COC claim against the shipped full-size spec's stages (each on one A100)."""
    import yaml

    from launcher.planner.arrcoc import estimate_pipeline
    from launcher.spec import validate

    text = "ARR-COC (vision encoder + 7B LLM) trains on one A100 in 20 GB"
    spec = validate(yaml.safe_load(ARRCOC_CONFIG.read_text())).model_dump(mode="json")
    est = estimate_pipeline(spec, "a100-40g-1")
    stages = ", ".join(f"{e['stage']} {gib(e['memory']['total'])}" for e in est["stages"])
    return _claim(text, 20 * GB, est["peak_per_device_bytes"],
                  f"configs/arrcoc/full.yaml ({spec['model']['source']}: frozen vision tower, texture adapter, "
                  f"bf16 LLM + LoRA r=32), micro_batch 1, per stage: {stages}; the largest stage against the "
                  f"claim's {gib(20 * GB)}")


def _claim(text: str, claimed: float, planner: float, detail: str) -> dict:
    # A memory claim holds when the planner's figure is within it (10% slack for rounding).
    return {
        "claim": text,
        "claimed_bytes": int(claimed),
        "planner_bytes": int(planner),
        "verdict": "holds" if planner <= claimed * 1.1 else "does-not-hold",
        "detail": detail,
    }


def format_claims(items: Optional[list] = None) -> str:
    lines = []
    for c in items if items is not None else claims():
        lines.append(f"[{c['verdict']}] {c['claim']}")
        lines.append(f"    {c['detail']}")
    return "\n".join(lines)
