"""The design document's memory and size claims, answered by the planner (`ftlaunch claims`)."""

from __future__ import annotations

from typing import Optional

from launcher.planner.counts import count_parameters, lora_closed_form, lora_counts
from launcher.planner.memory import GB, GIB, memory_per_gpu

LLAMA_7B_MODEL = {"source": "llama-2-7b", "config": {}, "seq_len": 512, "num_labels": None}


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
        f"{states['model_states'] / GB:.1f} GB of model states before activations; DeepSpeed ZeRO-2 on "
        "one GPU "
        f"(fp32 grad copy too) {ds['model_states'] / GIB:.1f} GiB",
    ))

    q = lora_counts(full, 16, "qlora")
    qmem = memory_per_gpu(q, None, "qlora", workers=1, micro_batch=1, seq_len=512, grad_checkpointing=True)
    qmem_nockpt = memory_per_gpu(q, None, "qlora", workers=1, micro_batch=1, seq_len=512)
    out.append(_claim(
        "QLoRA on a 7B model needs 6 GB", 6 * GB, qmem["total"],
        f"Llama-2-7B 4-bit (double quant) + LoRA r=16 all-linear, micro_batch 1, seq_len 512 with gradient "
        f"checkpointing: {qmem['total'] / GB:.2f} GB; without checkpointing "
        f"{qmem_nockpt['total'] / GB:.2f} GB",
    ))

    arr = memory_per_gpu(lora32, None, "lora", workers=1, micro_batch=1, seq_len=1024,
                         grad_checkpointing=True)
    arr_nockpt = memory_per_gpu(lora32, None, "lora", workers=1, micro_batch=1, seq_len=1024)
    out.append(_claim(
        "ARR-COC (vision encoder + 7B LLM) trains on one A100 in 20 GB", 20 * GB, arr["total"],
        "no ARR-COC config yet: the LLM part only, as Llama-2-7B bf16 + LoRA r=32 all-linear, micro_batch 1, "
        f"seq_len 1024 with gradient checkpointing: {arr['total'] / GB:.2f} GB (a lower bound: the frozen "
        f"vision encoder adds its weights); without checkpointing {arr_nockpt['total'] / GB:.2f} GB",
    ))

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
                      f"{size16 / 1e6:.0f} MB bf16, "
                      f"{size32 / 1e6:.0f} MB fp32 (q_proj,v_proj only: {qv * 2 / 1e6:.1f} MB bf16)",
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
