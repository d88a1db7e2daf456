"""`prefix`: prefix tuning (peft): trained key/value prefixes in every attention layer."""

from typing import Literal

from pydantic import Field

from launcher.fields import Strict
from launcher.strategies import Strategy, register_strategy


class PrefixStrategy(Strict):
    type: Literal["prefix"]
    num_virtual_tokens: int = Field(20, gt=0, le=512)


def prefix_config(spec, task_type: str):
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(num_virtual_tokens=spec.num_virtual_tokens, task_type=task_type)


register_strategy(Strategy(
    name="prefix", spec=PrefixStrategy, family="adapter",
    summary="prefix tuning: trained key/value prefixes per attention layer",
    peft_config=prefix_config,
    # transformers' checkpointed decoder layers drop the cache that carries the prefixes (measured:
    # the attention mask and keys disagree in length)
    no_checkpointing="its key/value prefixes travel in the cache, which checkpointed decoder layers drop",
))
