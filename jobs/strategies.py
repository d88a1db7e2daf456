"""The training-time side of strategies: `apply` (what the registered strategy makes
trainable, launcher/strategies/), reload and merge of adapters, learning-rate groups, the
gradual-unfreezing schedule and the EWC penalty."""

from __future__ import annotations

import math
import os
from typing import Callable, Iterable, Optional

import torch

from launcher.kinds.finetune import LrGroup
from launcher.strategies import get_strategy
from launcher.strategies.freeze import layer_index, matches


def apply(model, strategy):
    """The model to train under `strategy` (a `strategy:` block, dict or spec model), with exactly
    that strategy's parameters requiring gradients: adapters wrap it with peft (after the
    strategy's own base preparation, e.g. QLoRA's 4-bit quantization); the full and partial
    families mark the parameters their registration names."""
    from peft import get_peft_model

    registered = get_strategy(strategy)
    spec = registered.parse(strategy)
    if registered.is_adapter:
        if registered.prepare_base is not None:
            model = registered.prepare_base(model, spec)
        return get_peft_model(model, registered.peft_config(spec, task_type(model)))
    names = [n for n, _ in model.named_parameters()]
    trained = registered.trainable(spec, names)
    if not trained:
        raise ValueError(f"strategy {spec.model_dump(exclude_none=True)} leaves no parameter trainable; "
                         "check the patterns")
    set_trainable(model, lambda name: name in trained)
    return model


def task_type(model) -> str:
    return "SEQ_CLS" if type(model).__name__.endswith("ForSequenceClassification") else "CAUSAL_LM"


def set_trainable(model, trainable: Callable[[str], bool]) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(bool(trainable(name)))


def load_quantized(model, strategy):
    """A 4-bit copy of an in-memory model (QLoRA's base), e.g. to show a merge refuses it."""
    from launcher.strategies.qlora import load_quantized as quantize

    return quantize(model, get_strategy(strategy).parse(strategy))


def reload(export_dir: str, base, strategy):
    """An exported adapter onto a fresh base, for inference (onto the strategy's own prepared
    base: QLoRA's 4-bit one)."""
    from peft import PeftModel

    registered = get_strategy(strategy)
    if registered.prepare_base is not None:
        base = registered.prepare_base(base, registered.parse(strategy)).eval()
    return PeftModel.from_pretrained(base, export_dir).eval()


def load_adapter_weights(model, export_dir: str) -> None:
    """An exported adapter's weights into a freshly wrapped peft model of the same strategy (a
    pipeline stage that carries its adapter on); an adapter of another shape is refused."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    weights = load_peft_weights(export_dir, device="cpu")
    result = set_peft_model_state_dict(model, weights)
    unexpected = [k for k in result.unexpected_keys if "lora_" in k or "prompt" in k or "ia3_" in k]
    if unexpected:
        raise ValueError(f"init_adapter {export_dir}: its weights {unexpected[:2]} do not fit this strategy's "
                         "adapter; use the strategy that exported it")


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


def default_lr_groups(model) -> list[LrGroup]:
    """new (heads and adapters), early (embeddings and the first third of the blocks), pretrained."""
    layers = [i for n, _ in model.named_parameters() if (i := layer_index(n)) is not None]
    early = max(1, math.ceil((max(layers) + 1) / 3)) if layers else 0
    early_blocks = "|".join(str(i) for i in range(early))
    return [
        LrGroup(name="new", params=list(NEW_PARAMS), lr=DEFAULT_LR["new"]),
        LrGroup(name="early", params=["embed"] + ([rf"\.layers?\.({early_blocks})\."] if early else []),
                lr=DEFAULT_LR["early"]),
        LrGroup(name="pretrained", params=[".*"], lr=DEFAULT_LR["pretrained"]),
    ]


def param_groups(model, lr_groups, lr: float, lr_cap: Optional[float] = None,
                 only: Optional[set] = None) -> list[dict]:
    """Optimizer parameter groups: each parameter in the first group whose patterns match, the
    rest in `rest` at `lr`; `only` limits them to those names (default: requires_grad); every lr
    is capped at `lr_cap`. Empty groups are dropped. `lr_groups`: the spec's (LrGroup models, or
    the dicts of them), "default", or None."""
    groups = default_lr_groups(model) if lr_groups == "default" else [
        LrGroup.model_validate(g) for g in lr_groups or []]
    buckets = {g.name: [] for g in groups}
    rest = []
    for name, p in model.named_parameters():
        if (only is None and not p.requires_grad) or (only is not None and name not in only):
            continue
        for g in groups:
            if matches(name, g.params):
                buckets[g.name].append(p)
                break
        else:
            rest.append(p)
    cap = (lambda x: min(x, lr_cap)) if lr_cap else (lambda x: x)
    out = [{"name": g.name, "params": buckets[g.name], "lr": cap(g.lr)} for g in groups]
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

    def __init__(self, strategy, steps_per_epoch: int):
        spec = get_strategy(strategy).parse(strategy)
        self.events = sorted(
            (e.step if e.step is not None else math.ceil(e.epoch * steps_per_epoch), tuple(e.unfreeze))
            for e in spec.schedule
        )
        self.done = 0

    def eventual(self, strategy, model) -> set:
        """Every parameter that is trainable by the end of the schedule."""
        return get_strategy(strategy).trained_names(strategy, [n for n, _ in model.named_parameters()])

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
