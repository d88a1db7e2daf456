"""`gradual_unfreeze`: start with `train` (e.g. the head); each schedule entry unfreezes more.

The schedule runs in the job (jobs/strategies.Unfreezer); the planner plans the memory of the
fully opened schedule, the peak.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from launcher.fields import MAX_EPOCHS, MAX_STEPS, Patterns, Strict
from launcher.strategies import Strategy, register_strategy
from launcher.strategies.freeze import matches


class UnfreezeStep(Strict):
    step: Optional[int] = Field(None, ge=0, le=MAX_STEPS, description="unfreeze before this many steps are done")
    epoch: Optional[float] = Field(None, ge=0, le=MAX_EPOCHS, description="or after this many epochs")
    unfreeze: Patterns

    @model_validator(mode="after")
    def _one_time(self):
        if (self.step is None) == (self.epoch is None):
            raise ValueError("each schedule entry takes exactly one of step or epoch")
        return self


class GradualUnfreezeStrategy(Strict):
    type: Literal["gradual_unfreeze"]
    train: Patterns
    schedule: list[UnfreezeStep] = Field(min_length=1)


def eventual(spec: GradualUnfreezeStrategy, names: list) -> set:
    patterns = list(spec.train) + [p for entry in spec.schedule for p in entry.unfreeze]
    return {n for n in names if matches(n, patterns)}


register_strategy(Strategy(
    name="gradual_unfreeze", spec=GradualUnfreezeStrategy, family="partial",
    summary="train starts with `train`, the schedule unfreezes more groups by step or epoch",
    trainable=lambda spec, names: {n for n in names if matches(n, spec.train)},
    eventual=eventual,
))
