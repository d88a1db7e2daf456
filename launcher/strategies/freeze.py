"""`freeze`: train only some of the model's own parameters, chosen by name.

Patterns are regular expressions searched in parameter names: `train: [lm_head]` (freeze the
backbone, train the head), `freeze: [embed]`, or `freeze_first_layers: N` (the embeddings and
layers 0..N-1 frozen: the embeddings sit below layer 0).
"""

from __future__ import annotations

import re
from typing import Literal, Optional

from pydantic import Field, model_validator

from launcher.fields import MAX_STEPS, Patterns, Strict
from launcher.strategies import Strategy, register_strategy


class FreezeStrategy(Strict):
    type: Literal["freeze"]
    train: Optional[Patterns] = None
    freeze: Optional[Patterns] = None
    freeze_first_layers: Optional[int] = Field(None, ge=0, le=MAX_STEPS)

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [k for k in ("train", "freeze", "freeze_first_layers") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "a freeze strategy takes exactly one of train, freeze, freeze_first_layers"
                f" (got {', '.join(given) or 'none'})"
            )
        return self


def matches(name: str, patterns) -> bool:
    return any(re.search(p, name) for p in patterns)


def layer_index(name: str) -> Optional[int]:
    """The transformer block a parameter belongs to (`...layers.3...`, `...layer.3...`)."""
    found = re.search(r"\.layers?\.(\d+)\.", name)
    return int(found.group(1)) if found else None


def trainable(spec: FreezeStrategy, names: list) -> set:
    if spec.train is not None:
        return {n for n in names if matches(n, spec.train)}
    if spec.freeze is not None:
        return {n for n in names if not matches(n, spec.freeze)}
    first = spec.freeze_first_layers

    def late(name: str) -> bool:
        index = layer_index(name)
        return "embed" not in name and (index is None or index >= first)

    return {n for n in names if late(n)}


register_strategy(Strategy(
    name="freeze", spec=FreezeStrategy, family="partial",
    summary="some of the model's own parameters train (train / freeze patterns, or the first N layers frozen)",
    trainable=trainable,
))
