"""`lora`: low-rank adapters on the chosen linear layers (peft LoRA); the base stays frozen."""

from __future__ import annotations

from typing import Literal, Union

from pydantic import Field

from launcher.fields import Strict
from launcher.strategies import Strategy, register_strategy


class LoraStrategy(Strict):
    type: Literal["lora"]
    r: int = Field(8, gt=0, le=1024)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"


def lora_config(spec, task_type: str):
    """The peft LoraConfig of a LoRA (or QLoRA) block: the one place it is built."""
    from peft import LoraConfig

    return LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                      target_modules=spec.target_modules, task_type=task_type)


register_strategy(Strategy(
    name="lora", spec=LoraStrategy, family="adapter",
    summary="LoRA: r*(d_in+d_out) trainable parameters per adapted linear layer",
    peft_config=lora_config,
))
