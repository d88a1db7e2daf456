"""`full`: every parameter of the model trains."""

from typing import Literal

from launcher.fields import Strict
from launcher.strategies import Strategy, register_strategy


class FullStrategy(Strict):
    type: Literal["full"]


register_strategy(Strategy(
    name="full", spec=FullStrategy, family="full", summary="every parameter trains",
    trainable=lambda spec, names: set(names),
))
