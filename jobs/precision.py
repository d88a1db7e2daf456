"""How the torch engine runs an optimizer step: precision (bf16/fp16 autocast, fp16 loss scaling),
gradient accumulation over micro-batches (DDP all-reduces on the last one only), and the model
settings those need (gradient checkpointing, a 16-bit frozen base, trainable weights in fp32).

The loops build the model inputs; a `Stepper` runs their forward, backward and update.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve(precision: Optional[str], gpus_per_worker: float) -> str:
    """The precision a job runs: the spec's, or bf16 on GPUs and fp32 on CPU (as the planner)."""
    return precision or ("bf16" if gpus_per_worker > 0 else "fp32")


def base_dtype(spec) -> Optional[torch.dtype]:
    """The dtype the base loads in: 16-bit for an adapter strategy on GPUs (its weights never
    update, so no fp32 master copy is needed); None (fp32) otherwise."""
    from launcher.strategies import get_strategy

    precision = resolve(spec.train.precision, spec.resources.gpus_per_worker)
    if spec.resources.gpus_per_worker > 0 and precision != "fp32" and get_strategy(spec.strategy).is_adapter:
        return DTYPES[precision]
    return None


def trainable_in_fp32(model) -> None:
    """Trainable weights in fp32 whatever the base's dtype: AdamW updates them directly, and a
    16-bit weight would lose small updates."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def enable_checkpointing(model) -> None:
    """Non-reentrant gradient checkpointing on the (possibly peft-wrapped) model: each decoder
    layer's activations are recomputed in backward. Non-reentrant needs no input that requires a
    gradient, so frozen embeddings are fine; peft's hook is added for models that ask for it."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(inner, "supports_gradient_checkpointing", False):
        raise ValueError(f"train.grad_checkpointing: {type(inner).__name__} does not support gradient "
                         "checkpointing; set train.grad_checkpointing: false")
    inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    inner.config.use_cache = False  # a cache is never used in training, and checkpointing refuses it


def autocast(precision: str, device_type: str):
    """The autocast context of a precision (nothing for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=DTYPES[precision])


@dataclass
class Update:
    """What one optimizer step did: the mean loss of its micro-batches (a detached 0-d tensor on
    the model's device: reading it is a host sync, which the loop leaves to its report), the count
    the loop passed with them (tokens), and the penalty of its last micro-batch (EWC), if any."""

    loss: torch.Tensor
    count: int
    penalty: Optional[torch.Tensor] = None


class Stepper:
    """One optimizer step over `accumulation` micro-batches.

    `micro_step(forward)` runs `forward()` (it returns the loss of one micro-batch) under the
    precision's autocast, and backward of loss / accumulation, inside DDP's `no_sync` for all but
    the window's last micro-batch (one all-reduce per optimizer step). On the last it unscales
    (fp16), clips, steps the optimizer and returns an `Update`; before, it returns None.
    Gradients are cleared (set to None) after the window's first forward, as the loop always did:
    the memory planner counts the gradients freed there.
    """

    def __init__(self, model, optimizer, *, precision: str = "fp32", accumulation: int = 1,
                 grad_clip: Optional[float] = None, params: Optional[list] = None):
        if precision not in DTYPES:
            raise ValueError(f"train.precision: {precision!r} is not bf16, fp16 or fp32")
        device = next(model.parameters()).device
        if precision == "fp16" and device.type != "cuda":
            raise ValueError("train.precision: fp16 needs a GPU (gpus_per_worker > 0); use bf16 or fp32")
        self.model, self.optimizer = model, optimizer
        self.precision, self.accumulation, self.grad_clip = precision, int(accumulation), grad_clip
        self.device_type = device.type
        self.params = params  # None: those that require a gradient at each step (gradual unfreezing)
        self.scaler = torch.amp.GradScaler(self.device_type) if precision == "fp16" else None
        self._losses: list[torch.Tensor] = []
        self._count = 0

    def micro_step(self, forward: Callable[[], torch.Tensor], count: int = 0,
                   penalty: Optional[Callable[[], torch.Tensor]] = None) -> Optional[Update]:
        """One micro-batch; `penalty()`: a term added to every micro-batch's loss (EWC), reported apart."""
        first, last = not self._losses, len(self._losses) + 1 == self.accumulation
        with self._sync(last):
            with autocast(self.precision, self.device_type):
                loss = forward()
                extra = penalty() if penalty is not None else None
            if first:
                self.optimizer.zero_grad(set_to_none=True)
            total = loss if extra is None else loss + extra
            total = total.float() / self.accumulation
            (self.scaler.scale(total) if self.scaler else total).backward()
        self._losses.append(loss.detach().float())  # no .item(): the step stays asynchronous
        self._count += count
        if not last:
            return None
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.grad_clip:
            params = self.params if self.params is not None else [
                p for p in self.model.parameters() if p.requires_grad]
            torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], self.grad_clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        update = Update(torch.stack(self._losses).mean(), self._count,
                        extra.detach() if extra is not None else None)
        self._losses, self._count = [], 0
        return update

    def _sync(self, last: bool):
        no_sync = getattr(self.model, "no_sync", None)
        if last or no_sync is None or not isinstance(self.model, torch.nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return no_sync()
