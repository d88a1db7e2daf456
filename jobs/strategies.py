"""What each `strategy.type` makes trainable, and the training-time pieces strategies need:
learning-rate groups, the gradual-unfreezing schedule and the EWC penalty.

One function per strategy, registered by name: `apply(model, strategy)` returns the model to
train (peft methods wrap it) with exactly that strategy's parameters requiring gradients.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from typing import Callable, Iterable, Optional

import torch

APPLY: dict[str, Callable] = {}


def register(name: str):
    def add(fn):
        if name in APPLY:
            raise RuntimeError(f"strategy {name!r} is registered twice")
        APPLY[name] = fn
        return fn

    return add


def apply(model, strategy: dict):
    kind = strategy["type"]
    if kind not in APPLY:
        raise ValueError(f"strategy {kind!r} has no implementation; known: {', '.join(APPLY)}")
    return APPLY[kind](model, strategy)


def task_type(model) -> str:
    return "SEQ_CLS" if type(model).__name__.endswith("ForSequenceClassification") else "CAUSAL_LM"


def matches(name: str, patterns: Iterable[str]) -> bool:
    return any(re.search(p, name) for p in patterns)


def set_trainable(model, trainable: Callable[[str], bool]) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(bool(trainable(name)))


def layer_index(name: str) -> Optional[int]:
    """The transformer block a parameter belongs to (`...layers.3...`, `...layer.3...`)."""
    found = re.search(r"\.layers?\.(\d+)\.", name)
    return int(found.group(1)) if found else None


# ---------------------------------------------------------------------------------------------
# Strategies on the model's own parameters


@register("full")
def full(model, strategy: dict):
    set_trainable(model, lambda name: True)
    return model


@register("freeze")
def freeze(model, strategy: dict):
    if strategy.get("train"):
        set_trainable(model, lambda n: matches(n, strategy["train"]))
    elif strategy.get("freeze"):
        set_trainable(model, lambda n: not matches(n, strategy["freeze"]))
    else:
        first = int(strategy["freeze_first_layers"])

        def late(name: str) -> bool:  # the embeddings sit below layer 0: frozen with the first N
            index = layer_index(name)
            return "embed" not in name and (index is None or index >= first)

        set_trainable(model, late)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"freeze strategy {strategy} leaves no parameter trainable; check the patterns")
    return model


@register("gradual_unfreeze")
def gradual_unfreeze(model, strategy: dict):
    """Only `train` at first; `Unfreezer` opens the scheduled groups during training."""
    return freeze(model, {"train": strategy["train"]})


# ---------------------------------------------------------------------------------------------
# peft methods


def _wrap(model, config):
    from peft import get_peft_model

    return get_peft_model(model, config)


@register("lora")
def lora(model, strategy: dict):
    from peft import LoraConfig

    return _wrap(model, LoraConfig(
        r=strategy["r"], lora_alpha=strategy["alpha"], lora_dropout=strategy["dropout"],
        target_modules=strategy["target_modules"], task_type=task_type(model),
    ))


@register("qlora")
def qlora(model, strategy: dict):
    """LoRA over a 4-bit copy of the base: the linear layers become bitsandbytes Linear4bit."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    quantized = load_quantized(model, strategy,
                               AutoModelForSequenceClassification if task_type(model) == "SEQ_CLS"
                               else AutoModelForCausalLM)
    # Norms and head to fp32 for stable training; checkpointing is a memory choice, not QLoRA's.
    quantized = prepare_model_for_kbit_training(quantized, use_gradient_checkpointing=False)
    quantized.train()  # from_pretrained returns eval mode (DESIGN: call train() after loading)
    return lora(quantized, strategy)


def bnb_config(strategy: dict):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=strategy.get("quant_type", "nf4"),
        bnb_4bit_use_double_quant=strategy.get("double_quant", True),
        bnb_4bit_compute_dtype=getattr(torch, strategy.get("compute_dtype", "float32")),
    )


def load_quantized(model, strategy: dict, auto_class):
    """Quantize an in-memory model the way from_pretrained does: save it, load it in 4 bits."""
    from safetensors.torch import save_model

    with tempfile.TemporaryDirectory(prefix="ftl-qbase-") as folder:
        # Not save_pretrained: under torch.distributed it writes on rank 0 only, and every rank
        # quantizes its own copy.
        model.config.save_pretrained(folder)
        save_model(model, os.path.join(folder, "model.safetensors"))
        return auto_class.from_pretrained(folder, quantization_config=bnb_config(strategy),
                                          device_map="cpu" if not torch.cuda.is_available() else None)


@register("prefix")
def prefix(model, strategy: dict):
    from peft import PrefixTuningConfig

    return _wrap(model, PrefixTuningConfig(num_virtual_tokens=strategy["num_virtual_tokens"],
                                           task_type=task_type(model)))


@register("prompt")
def prompt(model, strategy: dict):
    from peft import PromptTuningConfig

    return _wrap(model, PromptTuningConfig(num_virtual_tokens=strategy["num_virtual_tokens"],
                                           task_type=task_type(model)))


@register("ia3")
def ia3(model, strategy: dict):
    from peft import IA3Config

    return _wrap(model, IA3Config(target_modules=strategy.get("target_modules"),
                                  feedforward_modules=strategy.get("feedforward_modules"),
                                  task_type=task_type(model)))


def reload(export_dir: str, base, strategy: dict):
    """An exported adapter onto a fresh base, for inference (QLoRA: onto a 4-bit base again)."""
    from peft import PeftModel

    if strategy["type"] == "qlora":
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        base = load_quantized(base, strategy, AutoModelForSequenceClassification
                              if task_type(base) == "SEQ_CLS" else AutoModelForCausalLM)
    return PeftModel.from_pretrained(base, export_dir).eval()


def merge(export_dir: str, base):
    """One plain model from a LoRA/QLoRA export: merged into a full-precision base (DESIGN: a
    QLoRA adapter merges into the bf16/fp32 base, never into the NF4 one)."""
    from peft import PeftModel

    if any(type(m).__name__ == "Linear4bit" for m in base.modules()):
        raise ValueError("merge a QLoRA adapter into the full-precision base, not the 4-bit one")
    return PeftModel.from_pretrained(base, export_dir).merge_and_unload().eval()


# ---------------------------------------------------------------------------------------------
# Learning-rate groups

# DESIGN's defaults: new layers 1e-3, the pretrained model 2e-5, its early layers 1e-5.
NEW_PARAMS = (r"(^|\.)(lm_head|classifier|score)\.", r"lora_", r"prompt_encoder", r"ia3_",
              r"modules_to_save")
DEFAULT_LR = {"new": 1e-3, "pretrained": 2e-5, "early": 1e-5}


def default_lr_groups(model) -> list[dict]:
    """new (heads and adapters), early (embeddings and the first third of the blocks), pretrained."""
    layers = [i for n, _ in model.named_parameters() if (i := layer_index(n)) is not None]
    early = max(1, math.ceil((max(layers) + 1) / 3)) if layers else 0
    early_blocks = "|".join(str(i) for i in range(early))
    return [
        {"name": "new", "params": list(NEW_PARAMS), "lr": DEFAULT_LR["new"]},
        {"name": "early", "params": ["embed"] + ([rf"\.layers?\.({early_blocks})\."] if early else []),
         "lr": DEFAULT_LR["early"]},
        {"name": "pretrained", "params": [".*"], "lr": DEFAULT_LR["pretrained"]},
    ]


def param_groups(model, lr_groups, lr: float, lr_cap: Optional[float] = None,
                 only: Optional[set] = None) -> list[dict]:
    """Optimizer parameter groups: each parameter in the first group whose patterns match, the
    rest in `rest` at `lr`; `only` limits them to those names (default: requires_grad); every lr
    is capped at `lr_cap`. Empty groups are dropped."""
    groups = default_lr_groups(model) if lr_groups == "default" else list(lr_groups or [])
    buckets = {g["name"]: [] for g in groups}
    rest = []
    for name, p in model.named_parameters():
        if (only is None and not p.requires_grad) or (only is not None and name not in only):
            continue
        for g in groups:
            if matches(name, g["params"]):
                buckets[g["name"]].append(p)
                break
        else:
            rest.append(p)
    cap = (lambda x: min(x, lr_cap)) if lr_cap else (lambda x: x)
    out = [{"name": g["name"], "params": buckets[g["name"]], "lr": cap(g["lr"])} for g in groups]
    out.append({"name": "rest", "params": rest, "lr": cap(lr)})
    return [g for g in out if g["params"]]


# ---------------------------------------------------------------------------------------------
# Gradual unfreezing


class Unfreezer:
    """The schedule of a gradual_unfreeze strategy, in optimizer steps.

    `at(model, step)` is called before step `step + 1` and unfreezes the groups due by then, so an
    entry `{step: k}` means the group trains from the (k+1)-th update on. Returns the parameter
    names it opened.
    """

    def __init__(self, strategy: dict, steps_per_epoch: int):
        self.events = sorted(
            (e["step"] if e.get("step") is not None else math.ceil(e["epoch"] * steps_per_epoch),
             tuple(e["unfreeze"]))
            for e in strategy["schedule"]
        )
        self.done = 0

    def eventual(self, strategy: dict, model) -> set:
        """Every parameter that is trainable by the end of the schedule."""
        patterns = list(strategy["train"]) + [p for _, ps in self.events for p in ps]
        return {n for n, _ in model.named_parameters() if matches(n, patterns)}

    def at(self, model, step: int) -> list[str]:
        opened = []
        while self.done < len(self.events) and self.events[self.done][0] <= step:
            patterns = self.events[self.done][1]
            for name, p in model.named_parameters():
                if not p.requires_grad and matches(name, patterns):
                    p.requires_grad_(True)
                    opened.append(name)
            self.done += 1
        return opened


# ---------------------------------------------------------------------------------------------
# Elastic weight consolidation


class EWC:
    """penalty = lambda/2 * sum_i F_i (theta_i - theta*_i)^2 over the trained parameters, where F
    is the diagonal empirical Fisher (mean squared per-example gradient of the loss) on the retain
    set, and theta* the weights before fine-tuning (Kirkpatrick et al., 2017)."""

    def __init__(self, model, examples: Iterable[dict], lam: float, names: Optional[set] = None):
        self.lam = lam
        params = {n: p for n, p in model.named_parameters()
                  if (p.requires_grad if names is None else n in names)}
        was_training, grad_state = model.training, {n: p.requires_grad for n, p in params.items()}
        for p in params.values():
            p.requires_grad_(True)
        model.eval()  # no dropout in the Fisher
        fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        count = 0
        for example in examples:
            model.zero_grad(set_to_none=True)
            model(**example).loss.backward()
            for n, p in params.items():
                if p.grad is not None:
                    fisher[n] += p.grad.detach().float() ** 2
            count += 1
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        for n, p in params.items():
            p.requires_grad_(grad_state[n])
        if count == 0:
            raise ValueError("EWC needs at least one retain example")
        self.fisher = {n: f / count for n, f in fisher.items()}
        self.anchor = {n: p.detach().clone() for n, p in params.items()}
        self.params = params

    def penalty(self) -> torch.Tensor:
        total = torch.zeros(())
        for n, p in self.params.items():
            total = total + (self.fisher[n] * (p - self.anchor[n]) ** 2).sum()
        return 0.5 * self.lam * total


def peak_rss_mb() -> float:
    """This process's peak resident set size (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")
