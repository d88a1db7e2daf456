"""One registration per fine-tuning strategy, read by the spec, the planner and the jobs alike.

A strategy is one file in this package that registers one `Strategy`: its spec model (the
`strategy:` block), its family (full / partial / adapter), what it exports, how it builds its
peft config (adapters) or which of the model's own parameters it trains (full, partial), and the
planner's facts about it. Nothing else in the project tests strategy names: it asks the registry.
A new strategy = one file here (+ its tests and a config).

torch and peft are imported inside the functions, never at module level: the client loads this.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Annotated, Any, Callable, Literal, Optional, Union

from pydantic import BaseModel, Field

from common.registry import add, import_package_modules

FAMILIES = ("full", "partial", "adapter")


@dataclasses.dataclass(frozen=True)
class Strategy:
    name: str
    spec: type[BaseModel]
    family: Literal["full", "partial", "adapter"]
    summary: str  # one line for docs and `ftlaunch plan`
    # adapters: (strategy spec, peft task type) -> a peft config
    peft_config: Optional[Callable[[Any, str], Any]] = None
    # full / partial: (strategy spec, parameter names) -> the names that train from the start
    trainable: Optional[Callable[[Any, list], set]] = None
    # partial with a schedule: (strategy spec, names) -> every name trainable by its end
    eventual: Optional[Callable[[Any, list], set]] = None
    # adapters that change the base first (QLoRA quantizes it): (model, spec) -> model
    prepare_base: Optional[Callable[[Any, Any], Any]] = None
    # the planner's memory model for it (launcher/planner memory_per_gpu strategy_type)
    memory_kind: Optional[str] = None
    # virtual tokens that lengthen every sequence (prompt tuning)
    virtual_tokens: Callable[[Any], int] = lambda spec: 0
    # why it cannot train with gradient checkpointing (None: it can)
    no_checkpointing: Optional[str] = None

    @property
    def export(self) -> str:
        """The run folder's artifact: `adapter/` for adapters, `model/` for everything else."""
        return "adapter" if self.family == "adapter" else "model"

    @property
    def is_adapter(self) -> bool:
        return self.family == "adapter"

    @property
    def memory_type(self) -> str:
        return self.memory_kind or self.name

    def parse(self, strategy: Union[dict, BaseModel]) -> BaseModel:
        """The strategy block as this strategy's spec model (dicts come from JSON plans)."""
        return strategy if isinstance(strategy, self.spec) else self.spec.model_validate(strategy)

    def trained_names(self, strategy, names: list) -> set:
        """Every parameter the optimizer may ever update (full and partial families)."""
        spec = self.parse(strategy)
        if self.eventual is not None:
            return set(self.eventual(spec, names))
        return set(self.trainable(spec, names))


STRATEGIES: dict[str, Strategy] = {}
# The order the registry lists strategies in; every file of this package registers one.
_LISTED_FIRST = ("full", "freeze", "gradual_unfreeze", "lora", "qlora", "prefix", "prompt", "ia3")


def register_strategy(strategy: Strategy) -> Strategy:
    """Add a strategy; its spec model's `type:` tag must be its name; a duplicate fails."""
    tag = typing.get_args(strategy.spec.model_fields["type"].annotation)
    if tag != (strategy.name,):
        raise RuntimeError(f"strategy {strategy.name!r}: its spec model's type is {tag}")
    if strategy.family not in FAMILIES:
        raise RuntimeError(f"strategy {strategy.name!r}: family {strategy.family!r} is not one of {FAMILIES}")
    if (strategy.family == "adapter") != (strategy.peft_config is not None) or (
            strategy.family != "adapter") != (strategy.trainable is not None):
        raise RuntimeError(f"strategy {strategy.name!r}: adapters build a peft config, the others "
                           "say which parameters train")
    return add(STRATEGIES, strategy.name, strategy, "strategy")


def get_strategy(strategy: Union[str, dict, BaseModel]) -> Strategy:
    """The registration of a strategy name, a `strategy:` dict or a strategy spec model."""
    name = strategy if isinstance(strategy, str) else (
        strategy.get("type") if isinstance(strategy, dict) else strategy.type)
    if name not in STRATEGIES:
        raise KeyError(f"strategy {name!r} is unknown; use one of: {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


def spec_union():
    """The `strategy:` field's type: every registered spec model, discriminated on `type`."""
    return Annotated[Union[tuple(s.spec for s in STRATEGIES.values())], Field(discriminator="type")]


def names(family: Optional[str] = None) -> tuple[str, ...]:
    return tuple(n for n, s in STRATEGIES.items() if family is None or s.family == family)


import_package_modules(__name__, __path__, first=_LISTED_FIRST)
