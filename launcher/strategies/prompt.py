"""`prompt`: prompt tuning (peft): trained virtual token embeddings before the input."""

from typing import Literal

from launcher.strategies import Strategy, register_strategy
from launcher.strategies.prefix import PrefixStrategy


class PromptStrategy(PrefixStrategy):  # the same block: how many virtual tokens
    type: Literal["prompt"]


def prompt_config(spec, task_type: str):
    from peft import PromptTuningConfig

    return PromptTuningConfig(num_virtual_tokens=spec.num_virtual_tokens, task_type=task_type)


register_strategy(Strategy(
    name="prompt", spec=PromptStrategy, family="adapter",
    summary="prompt tuning: trained virtual token embeddings before the input",
    peft_config=prompt_config,
    virtual_tokens=lambda spec: spec.num_virtual_tokens,  # every sequence is that much longer
))
