"""Exact parameter counts from a model's config on the meta device (no weights, no GPU): total,
trainable under each strategy (freeze rules, the peft config built for counting, LoRA's closed form),
and the shapes the memory model and the re-estimates need without torch.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from typing import Any, Optional, Union

from common.catalog import config_for
from launcher.errors import ConfigError, MissingExtraError, PlanError
from launcher.strategies import get_strategy
from launcher.strategies.lora import LoraStrategy


def _not_deepspeed_cpu_fallback(record) -> bool:
    return "Setting accelerator to CPU" not in record.getMessage()


def require_torch():
    """torch and transformers for the client's own uses (counts, model make, infer)."""
    import logging
    import warnings

    # Library chatter on import is not the client's output: bitsandbytes' optional CPU kernels,
    # transformers deprecations, and DeepSpeed's "no GPU" line (on stdout), which transformers'
    # save_pretrained brings in through accelerate. DeepSpeed resets its logger's level when it
    # makes it, and keeps its filters.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("DeepSpeed").addFilter(_not_deepspeed_cpu_fallback)
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    try:
        import torch
        import transformers
    except ImportError:
        raise MissingExtraError("torch", "train") from None
    return torch, transformers


def _is_classifier(model: dict, config) -> bool:
    kind = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", "")
    return bool(model.get("num_labels")) or kind == "bert"


def _build_meta(model: dict):
    torch, transformers = require_torch()
    config = config_for(model)
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


def linear_layers(net) -> list[tuple[str, int, int]]:
    torch, _ = require_torch()
    heads = _head_names(net)
    return [
        (name, m.in_features, m.out_features)
        for name, m in net.named_modules()
        if isinstance(m, torch.nn.Linear) and name not in heads
    ]


def targets_match(name: str, targets) -> bool:
    """peft's rule: a string is a full-match regex, a list matches the name or a dotted suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _check_targets(model: dict, strategy: dict, linears: list) -> None:
    """LoRA target_modules that name no linear layer of the model fail in peft on the cluster:
    refuse them here, with the names that would match."""
    targets = strategy.get("target_modules")
    if not isinstance(get_strategy(strategy).parse(strategy), LoraStrategy) or not isinstance(targets, list):
        return
    if any(targets_match(name, targets) for name, _, _ in linears):
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
        if target_modules == "all-linear" or targets_match(name, target_modules):
            total += r * (d_in + d_out)
    return total


def json_cached(maxsize: int):
    """Memoise a function of JSON-able arguments (spec blocks); each caller gets its own copy."""
    def wrap(fn):
        @functools.lru_cache(maxsize=maxsize)
        def by_key(key: str):
            return fn(*json.loads(key))

        @functools.wraps(fn)
        def call(*args):
            return copy.deepcopy(by_key(json.dumps(args, sort_keys=True, default=str)))
        return call
    return wrap


@json_cached(maxsize=32)
def count_parameters(model: dict, strategy: dict) -> dict:
    """Exact total and trainable parameters: by closed form from the config where the architecture
    and the strategy allow (no torch: planner/closed_form.py), else from the config on the meta
    device (no weights). Both give the same counts (tests/unit/test_closed_form.py)."""
    kind = strategy.get("type", "full")
    try:
        registered = get_strategy(kind)
    except KeyError:
        raise PlanError(f"strategy {kind!r} is unknown to the planner") from None
    spec = registered.parse(strategy)
    shape = _closed_form_shape(model, strategy, registered, spec) or _meta_shape(model, strategy, registered, spec)
    base_total, linears = shape["base_total"], shape["linears"]
    counts: dict[str, Any] = {"method": kind}
    if isinstance(spec, LoraStrategy):
        counts["lora_closed_form"] = lora_closed_form(linears, spec.r, spec.target_modules)
    if "trainable" in shape:  # an adapter, counted by peft on the meta device
        total, trainable = shape["total"], shape["trainable"]
    elif registered.is_adapter:  # LoRA by closed form; peft trains a classifier head in full beside it
        trainable = counts["lora_closed_form"] + shape["head"]
        total = base_total + trainable
    else:  # full and partial: the parameters the registration names (a schedule's peak: all it opens)
        named = shape["named"]
        trained = registered.trained_names(spec, list(named))
        total, trainable = base_total, sum(named[n] for n in trained)
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
        quantizable=int(sum(d_in * d_out for _, d_in, d_out in linears)),
        largest_layer=int(shape["largest_layer"]),
        linear_shapes=[[n, i, o, c] for (n, i, o), c in groups.items()],
        dims=dims_of(shape["config"], num_labels=model.get("num_labels"), causal_lm=not shape["classifier"]),
    )
    return counts


def _closed_form_shape(model: dict, strategy: dict, registered, spec) -> Optional[dict]:
    """The model's parameter names, linear layers and sizes from its config alone, or None where
    the architecture is not tabled or the strategy's count needs peft (prompt, prefix, IA3, or
    LoRA aimed at an output head)."""
    from launcher.planner import closed_form

    if registered.is_adapter and not isinstance(spec, LoraStrategy):
        return None
    config = closed_form.config_dict(model)
    table = closed_form.table_for(config, model.get("num_labels")) if config else None
    if table is None:
        return None
    if isinstance(spec, LoraStrategy) and isinstance(spec.target_modules, list) and any(
            targets_match(name.rsplit(".", 1)[0], spec.target_modules) for name in table.head):
        return None
    _check_targets(model, strategy, table.linears)
    return {"base_total": table.total, "named": dict(table.params), "linears": table.linears,
            "largest_layer": max(table.modules),
            # peft (SEQ_CLS) trains a classifier head in full beside the adapter: a copy of it
            "head": sum(dict(table.params)[n] for n in table.head) if model.get("num_labels") else 0,
            "config": config, "classifier": _is_classifier(model, config)}


def _meta_shape(model: dict, strategy: dict, registered, spec) -> dict:
    """The same facts from the model built on the meta device; adapters counted by peft itself."""
    torch, _ = require_torch()
    net, config = _build_meta(model)
    linears = linear_layers(net)
    classifier = _is_classifier(model, config)
    shape = {"base_total": sum(p.numel() for p in net.parameters()),  # shared (tied) tensors count once
             "named": {n: p.numel() for n, p in net.named_parameters()}, "linears": linears,
             "largest_layer": max(sum(p.numel() for p in m.parameters(recurse=False)) for m in net.modules()),
             "config": net.config, "classifier": classifier}
    if registered.is_adapter:
        task_type = ("SEQ_CLS" if model.get("num_labels") else
                     "FEATURE_EXTRACTION" if classifier else "CAUSAL_LM")
        try:
            import peft
        except ImportError:
            raise MissingExtraError("peft", "train") from None

        _check_targets(model, strategy, linears)
        with torch.device("meta"):
            try:
                wrapped = peft.get_peft_model(net, registered.peft_config(spec, task_type))
            except (ValueError, TypeError, KeyError) as exc:  # the job's get_peft_model would fail alike
                raise ConfigError(
                    f"strategy: peft cannot apply {strategy.get('type', 'full')} to model "
                    f"{model.get('source', 'tiny-llama')}: "
                    f"{_first_line(exc)}; fix the strategy's module names or use the defaults"
                ) from None
        shape["trainable"], shape["total"] = wrapped.get_nb_trainable_parameters()
    return shape


def dims_of(config, num_labels=None, causal_lm=True) -> dict:
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
        "attention_dropout": float(get("attention_dropout", None)
                                   or get("attention_probs_dropout_prob", None) or 0.0),
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
