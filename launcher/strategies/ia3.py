"""`ia3`: IA3 (peft): trained scaling vectors on attention and feed-forward activations."""

from typing import Literal, Optional

from pydantic import Field

from launcher.fields import Strict
from launcher.strategies import Strategy, register_strategy


class Ia3Strategy(Strict):
    type: Literal["ia3"]
    target_modules: Optional[list[str]] = Field(None, description="default: peft's per-architecture choice")
    feedforward_modules: Optional[list[str]] = None


def ia3_config(spec, task_type: str):
    from peft import IA3Config

    return IA3Config(target_modules=spec.target_modules, feedforward_modules=spec.feedforward_modules,
                     task_type=task_type)


register_strategy(Strategy(
    name="ia3", spec=Ia3Strategy, family="adapter",
    summary="IA3: trained scaling vectors on attention and feed-forward activations",
    peft_config=ia3_config,
))
