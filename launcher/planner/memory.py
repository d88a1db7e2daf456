"""Memory per GPU of one training step: model states (weights, gradients, optimizer; ZeRO
partitions, offload, QLoRA's 4-bit base) and the activations autograd keeps, term by term.

Works from the counts alone (launcher/planner/counts.py), so alternatives are re-estimated
without building a model again.
"""

from __future__ import annotations

import re
from typing import Optional

from launcher.errors import PlanError
from launcher.planner.counts import dims_of, targets_match

GB = 10**9
GIB = 2**30
QLORA_BITS = 4.127  # NF4 4 bits + 8-bit absmax per 64 weights + fp32 absmax-of-absmax per 256 blocks


def _adapted_modules(counts: dict, strategy_type: str) -> list[tuple[str, int, int]]:
    """(last name, d_in, how many) of the linear layers a LoRA/QLoRA adapter wraps."""
    if strategy_type not in ("lora", "qlora"):
        return []
    targets = counts.get("lora_targets", "all-linear")
    out = []
    for name, d_in, _d_out, n in counts.get("linear_shapes", []):
        if targets == "all-linear" or targets_match(name, targets) or (
                isinstance(targets, str) and re.search(targets, name)):
            out.append((name, d_in, n))
    return out


def activation_terms(
    dims: dict,
    counts: dict,
    strategy_type: str,
    *,
    micro_batch: int,
    seq_len: int,
    mixed: bool,
    grad_checkpointing: bool = False,
    on_gpu: bool = True,
    grads_freed: float = 0.0,
    autocast_fp32_base: bool = False,
) -> tuple[dict, list[str]]:
    """Bytes of the activations live at the peak of one training step, one entry per term.

    Counted as the tensors autograd saves in the forward pass (what transformers' Llama and BERT
    code keeps for backward), plus the loss's transient buffers at the start of backward. Element
    sizes: `a` = 4 B in fp32, 2 B in bf16/fp16; `f` = 4 B for what runs in fp32 even under mixed
    precision (norm inputs upcast, softmax, logits for the loss); dropout masks 1 B on a GPU
    (fused native_dropout keeps a bool mask) and 4 B on CPU (torch scales a float mask).
    `grads_freed`: gradient bytes released between forward and backward (the training loop's
    zero_grad(set_to_none=True)), which the loss's backward buffers can reuse.
    Measured against peaks of live tensor bytes on CPU fp32 by bench/b6_memory.py (within 0.2%
    for full, LoRA, LoRA with dropout, eager and SDPA attention). The 16-bit terms follow the same
    reading of the code but are not measured yet: an earlier H200 check (0.94B Llama, fp32 weights
    + bf16 autocast) found peak minus model states 1.9x Korthikanti's formula for full fine-tuning
    with eager attention and 2.8x for LoRA; the eager fp32 softmax + cast, the fp32 norm inputs,
    the fp32 logits and peft's fp32 input casts counted here are those gaps.
    `autocast_fp32_base`: 16-bit autocast over fp32 weights (the torch engine): the residual stream
    and the norms' outputs stay fp32, and an adapter's input is kept as autocast's 16-bit copy.
    """
    b, s = micro_batch, seq_len
    h, heads, layers = dims["hidden_size"], dims["num_heads"], dims["num_layers"]
    inter = dims.get("intermediate_size") or 4 * h
    vocab = dims["vocab_size"]
    a, f = (2, 4) if mixed else (4, 4)
    n_ = f if autocast_fp32_base else a  # a norm's output: fp32 when the weights are
    m1 = 1 if on_gpu else 4  # dropout mask bytes per element
    bsh, bsi = b * s * h, b * s * inter
    full_like = strategy_type in ("full", "freeze")
    adapted = _adapted_modules(counts, strategy_type)
    names = {n for n, _, _ in adapted}
    lora_p = float(counts.get("lora_dropout") or 0.0)
    # lora_A keeps the very tensor the frozen base layer reads only when no dropout and no dtype
    # cast sit between them; otherwise it keeps its own copy (counted under "lora")
    shares_input = bool(adapted) and not mixed and not lora_p

    def needs_input(*mods):  # a linear layer's input is kept when its weight trains or lora_A reads it
        if full_like:
            return True
        if not shares_input:
            return False
        return dims.get("arch") == "encoder" or bool(names & set(mods))

    eager = dims.get("attn_implementation", "sdpa") == "eager"
    p_attn = dims.get("attention_dropout", 0.0)
    notes = [] if not mixed else [
        "16-bit activation terms follow transformers' code but are not yet measured on a GPU "
        "(fp32 terms are, by B6)"]
    if dims.get("arch") == "encoder":
        p_hid = dims.get("hidden_dropout", 0.0)
        mask = m1 if p_hid else 0
        ln_in = f if mixed else a
        per_layer_bsh = (a if needs_input() else 0) + 3 * a + a + mask + ln_in + a + mask + ln_in
        per_layer_bsi = 2 * a
        notes.append(
            "activations (BERT encoder layer): saved q, k, v, context, LayerNorm inputs and outputs, "
            f"dropout masks (p={p_hid:g}), FFN input and GELU in/out (2*s*b*intermediate)")
        embed = (ln_in + mask + a) * bsh
    else:
        per_layer_bsh = (
            2 * f                                   # RMSNorm inputs (upcast to fp32), attention and MLP
            + (2 * n_ if full_like else 0)          # normalised x, kept for the trainable norm weight
            + (a if needs_input("q_proj", "k_proj", "v_proj") else 0)
            + 3 * a                                 # q, k (after rotary), v
            + (a if (needs_input("o_proj") or not eager) else 0)  # context (SDPA keeps its output)
            + (a if needs_input("gate_proj", "up_proj") else 0)
        )
        per_layer_bsi = (3 + (1 if needs_input("down_proj") else 0)) * a  # gate, silu(gate), up, product
        notes.append(
            "activations (Llama layer): RMSNorm inputs in fp32, q, k, v, context, MLP gate/up/silu/product; "
            "a linear layer's input is kept only when its weight or adapter trains; k, v at full width")
        embed = 0
    scores = 0.0
    if eager:
        # softmax in fp32 (then cast to the activation dtype) + dropout mask and output
        per_score = f + (a if mixed else 0) + ((m1 + a) if p_attn else 0)
        scores = per_score * b * heads * s * s
        notes.append(f"eager attention: b*heads*s^2 probabilities kept ({per_score} B each"
                     f"{', incl. dropout mask and output' if p_attn else ''})")
    else:
        scores = f * b * heads * s  # log-sum-exp only; no s^2 term
        notes.append("SDPA attention (transformers' default): no s^2 probabilities kept, only log-sum-exp"
                     + ("; attention dropout assumed fused" if p_attn else ""))

    lora_extra = 0.0
    r = int(counts.get("lora_r") or 8)
    for name, d_in, n in adapted:
        # lora_A's output (kept by lora_B); with dropout, its output (kept by lora_A) and its mask
        # (kept unless the input needs no gradient: the first layer's q, k, v read the frozen
        # embeddings); without dropout on a 16-bit base, peft's cast of the input to the fp32
        # adapter dtype (a copy per adapted layer)
        per_token = r * (f if mixed else a)
        if lora_p:
            per_token += d_in * (f if mixed else a)
            reads_embeddings = name in ("q_proj", "k_proj", "v_proj") and dims.get("arch") != "encoder"
            masked = n - (1 if reads_embeddings else 0)
            lora_extra += masked * b * s * d_in * m1
        elif mixed:
            per_token += d_in * (a if autocast_fp32_base else f)
        lora_extra += n * b * s * per_token
    if adapted:
        notes.append("LoRA: r-wide lora_A output per adapted layer"
                     + (f", dropout (p={lora_p:g}) mask and output of each adapted layer's input"
                        if lora_p else "")
                     + (", fp32 copy of each adapted layer's input (fp32 adapters on a 16-bit base)"
                        if mixed and not lora_p else ""))

    layer = per_layer_bsh * bsh + per_layer_bsi * bsi + scores
    adapters_on_decoder = strategy_type in ("lora", "qlora", "ia3") and dims.get("arch") != "encoder"
    first_input = f * bsh if adapters_on_decoder else 0
    terms = {}
    if grad_checkpointing:
        # HF checkpointing keeps each layer's input; backward recomputes one layer at a time, after
        # the loss's and the final norm's buffers are freed: the larger of the two sets the peak
        # (measured by B6 on CPU). The recomputed layer comes with the incoming gradient (s*b*h).
        terms["layer_inputs"] = layers * n_ * bsh  # the residual stream: fp32 under autocast over fp32 weights
        recomputed = layer + lora_extra / max(1, layers) + n_ * bsh
        notes.append("activation checkpointing: each layer's input (s*b*h) kept, one layer recomputed "
                     "at a time (after the loss's buffers are freed)")
    else:
        terms["layers"] = layers * layer - first_input
        terms["lora"] = lora_extra
    if dims.get("arch") == "encoder":
        terms["embeddings"] = embed
    else:
        # final RMSNorm: input (fp32), normalised x and output kept when the norm and head train
        terms["final_norm"] = (f + (2 * n_ if full_like else 0)) * bsh
    head_terms = terms.get("embeddings", 0) + terms.get("final_norm", 0)
    terms["batch"] = 4 * b * s * 8  # input_ids, attention_mask, labels and the shifted labels, int64
    if dims.get("causal_lm", True):
        # The loss upcasts logits to fp32 and keeps log_softmax (f); at backward's start the logits'
        # gradient and log_softmax's gradient (f each, + a 16-bit cast) are live at once.
        terms["logits_saved"] = f * b * s * vocab
        fwd = a + (f if mixed else 0)
        bwd = 2 * f + (a if mixed else 0)
        bsv = b * s * vocab
        terms["loss_transient"] = max(fwd * bsv, bwd * bsv - grads_freed)
        notes.append(f"loss: fp32 log_softmax kept (4*s*b*vocab), and the larger of the logits "
                     f"({fwd}*s*b*vocab) at "
                     f"forward's end or {bwd}*s*b*vocab of gradients at backward's start"
                     + (" (where the parameter gradients freed by zero_grad(set_to_none=True) are not "
                        "yet back)"
                        if grads_freed else ""))
    else:
        labels = dims.get("num_labels") or 2
        terms["logits_saved"] = f * b * labels
        terms["loss_transient"] = 2 * f * b * labels
        notes.append("classifier logits")
    if grad_checkpointing:  # the recomputed layer beyond what the loss and final norm held at their peak
        terms["recomputed_layer"] = max(0.0, recomputed - head_terms - terms["logits_saved"] - terms["loss_transient"])
    return terms, notes


def memory_per_gpu(
    counts: dict,
    model_cfg,
    strategy_type: str,
    *,
    workers: int,
    micro_batch: int,
    seq_len: int,
    zero_stage: int = 0,
    offload_optimizer: bool = False,
    offload_params: bool = False,
    precision: str = "bf16",
    grad_checkpointing: bool = False,
    virtual_tokens: int = 0,
    on_gpu: bool = True,
    autocast: bool = False,
    base_16bit: bool = False,
    accumulation: int = 1,
) -> dict:
    """Bytes per GPU (per worker on a CPU run): weights, gradients, optimizer, activations, total.

    `autocast`: the torch engine's mixed precision (jobs/precision.py): weights, gradients and
    AdamW states stay fp32 and autocast computes in 16 bits (keeping 16-bit copies of the weights
    it casts); otherwise a 16-bit `precision` is DeepSpeed's (16-bit weights and gradients, fp32
    master copy). `base_16bit`: the frozen base is loaded in 16 bits (adapters on GPUs).
    `accumulation` > 1: the gradients stay live through every micro-batch's backward."""
    if zero_stage not in (0, 1, 2, 3):
        raise PlanError(f"zero_stage {zero_stage} is invalid; use 0, 1, 2 or 3")
    if offload_optimizer and zero_stage == 0:
        raise PlanError("offload_optimizer needs DeepSpeed ZeRO (zero_stage 1, 2 or 3)")
    if offload_params and zero_stage != 3:
        raise PlanError("offload_params needs ZeRO-3 (zero_stage: 3)")
    if precision not in ("bf16", "fp16", "fp32"):
        raise PlanError(f"precision {precision!r} is invalid; use bf16, fp16 or fp32")
    dims = counts["dims"] if model_cfg is None else (
        model_cfg if isinstance(model_cfg, dict) and "num_layers" in model_cfg else
        dims_of(model_cfg, counts["dims"].get("num_labels"), counts["dims"].get("causal_lm", True))
    )
    mixed = precision != "fp32"
    n = max(1, int(workers)) if zero_stage else 1
    T, F, L = counts["trainable"], counts["frozen"], counts["largest_layer"]
    states16 = mixed and not autocast  # DeepSpeed's 16-bit weights and gradients
    wb, gb = (2, 2) if states16 else (4, 4)
    ob = 12 if states16 else 8  # fp32 master + Adam m, v; in fp32 the weights are the master copy
    g32 = 4 if (states16 and zero_stage) else 0  # DeepSpeed keeps an fp32 gradient partition
    fb = 2 if (states16 or base_16bit) else 4  # bytes per frozen weight
    assumptions = [
        "AdamW, " + (f"mixed precision {precision}: 2 B weights + 2 B grads + 12 B fp32 master, m, v "
                     "per trainable param" if states16 else
                     (f"{precision} autocast over " if mixed else "") +
                     "fp32: 4 B weights + 4 B grads + 8 B Adam m, v per trainable param"),
    ]
    if base_16bit:
        assumptions.append(f"frozen base loaded in {precision} (2 B/param); trainable weights fp32")

    # Frozen weights: kept, never updated; 4-bit for QLoRA's quantized linear layers.
    if strategy_type == "qlora":
        q = min(counts["quantizable"], F)
        frozen_bytes = q * QLORA_BITS / 8 + (F - q) * fb
        assumptions.append(
            f"QLoRA: linear layers at {QLORA_BITS} bits/param (NF4 + double quantization); "
            "embeddings, norms and the output head stay 16-bit"
        )
    else:
        frozen_bytes = F * fb
    cpu = 0.0
    if zero_stage == 3:
        frozen_bytes /= n
        if offload_params:
            cpu += frozen_bytes
            frozen_bytes = 0.0

    if zero_stage == 0:
        w, g, o = wb * T, gb * T, ob * T
    elif zero_stage == 1:
        w, g, o = wb * T, gb * T + g32 * T / n, ob * T / n
    elif zero_stage == 2:
        w, g, o = wb * T, (gb + g32) * T / n, ob * T / n
    else:  # the gathered largest layer's 16-bit params and grads stay live
        w, g, o = wb * T / n + 2 * L, (g32 or gb) * T / n + 2 * L, ob * T / n
    if zero_stage:
        assumptions.append(
            f"DeepSpeed ZeRO-{zero_stage} over {n} data-parallel workers; as DeepSpeed does, "
            "an fp32 gradient partition (4 B/param / N) is kept for the optimizer step"
            + ("; ZeRO-3 keeps the largest layer gathered (4 B/param of it)" if zero_stage == 3 else "")
        )
    if offload_optimizer:
        partitioned_grads = (g32 or gb) * T / n
        cpu += o + partitioned_grads
        o = 0.0
        g = 2 * L if zero_stage == 3 else 0.0  # grads stream to CPU as they are reduced
        assumptions.append("optimizer offload: fp32 master, m, v and grads live in CPU memory")
    if offload_params:
        cpu += w - 2 * L
        w = 2 * L
        assumptions.append("parameter offload: 16-bit parameters live in CPU memory, fetched per layer")

    # Activations: the tensors autograd saves for backward, counted term by term (see
    # activation_terms; calibrated against measured CPU peaks by bench/b6_memory.py).
    terms, act_notes = activation_terms(
        dims, counts, strategy_type, micro_batch=micro_batch, seq_len=seq_len + virtual_tokens,
        mixed=mixed, grad_checkpointing=grad_checkpointing, on_gpu=on_gpu,
        grads_freed=g if zero_stage == 0 and accumulation <= 1 else 0.0,
        autocast_fp32_base=autocast and mixed and not base_16bit,
    )
    if autocast and mixed:
        # autocast casts each fp32 weight a matmul reads to a 16-bit copy: backward keeps it (for the
        # gradient of the matmul's input), and autocast caches the copies of trainable weights until
        # the forward ends. Checkpointing drops the saved copies; the cached ones stay.
        dims_ = counts["dims"]
        head = dims_["vocab_size"] if dims_.get("causal_lm", True) else (dims_.get("num_labels") or 2)
        matmul_weights = counts.get("quantizable", 0) + head * dims_["hidden_size"]
        trainable_cast = min(T, matmul_weights) if strategy_type in ("full", "freeze") else T
        if base_16bit:
            cast = T  # only the fp32 adapters are cast
        elif grad_checkpointing:
            cast = trainable_cast
        else:
            cast = matmul_weights + (0 if strategy_type in ("full", "freeze") else T)
        terms["autocast_weight_copies"] = 2 * cast
        act_notes.append("autocast: 16-bit copies of the fp32 weights matmuls read (saved for backward; "
                         "trainable ones cached until the forward ends)")
    if accumulation > 1:
        act_notes.append(f"gradient accumulation over {accumulation} micro-batches: the gradients stay "
                         "live through each backward")
    assumptions += act_notes
    logits = terms["logits_saved"] + terms["loss_transient"]
    act = sum(terms.values()) - logits
    if virtual_tokens:
        assumptions.append(f"prompt tuning lengthens the sequence by {virtual_tokens} virtual tokens")

    # The optimizer step runs after backward has freed the activations; its temporaries can set the
    # peak instead (measured: torch's single-tensor AdamW, the CPU default, allocates 2 fp32 copies
    # of the tensor it updates; the foreach AdamW, the CUDA default, one fp32 copy of all of them).
    # DeepSpeed's fused optimizers update in place.
    if zero_stage:
        opt_temp = 0.0
    elif on_gpu:
        opt_temp = 4.0 * T
    else:
        opt_temp = 2 * 4.0 * (L if strategy_type in ("full", "freeze") else min(T, L))
    if opt_temp > act + logits:
        assumptions.append("the peak is at the optimizer step: AdamW's temporaries "
                           + ("(foreach: 4 B per trainable param)" if on_gpu else
                              "(single-tensor: 2 fp32 copies of the largest trainable tensor)")
                           + " exceed the activations")

    weights = w + frozen_bytes
    model_states = weights + g + o
    total = model_states + max(act + logits, opt_temp)
    paper = {0: 16 * T, 1: 4 * T + 12 * T / n, 2: 2 * T + 14 * T / n, 3: 16 * T / n}[zero_stage]
    return {
        "weights": int(weights),
        "gradients": int(g),
        "optimizer": int(o),
        "activations": int(act + logits),
        "logits": int(logits),
        "activation_terms": {k: int(v) for k, v in terms.items()},
        "optimizer_step_temp": int(opt_temp),
        "total": int(total),
        "model_states": int(model_states),
        "model_states_zero_paper": int(paper) if states16 else None,  # the paper's 16-bit states
        "cpu_offload": int(cpu),
        "assumptions": assumptions,
        "inputs": {
            "counts": counts,
            "strategy_type": strategy_type,
            "workers": workers,
            "micro_batch": micro_batch,
            "seq_len": seq_len,
            "zero_stage": zero_stage,
            "offload_optimizer": offload_optimizer,
            "offload_params": offload_params,
            "precision": precision,
            "grad_checkpointing": grad_checkpointing,
            "virtual_tokens": virtual_tokens,
            "on_gpu": on_gpu,
            "autocast": autocast,
            "base_16bit": base_16bit,
            "accumulation": accumulation,
        },
    }


def remeasure(memory: dict, counts: Optional[dict] = None, **changes) -> dict:
    """The same estimate with some of its settings changed (and other counts, for a new strategy)."""
    inputs = {k: v for k, v in memory["inputs"].items() if k != "counts"}
    inputs.update(changes)
    return memory_per_gpu(counts or memory["inputs"]["counts"], None, **inputs)
