"""The spec's building blocks shared by every model of it (kinds, strategies, data): the strict
base model, checked field types, and the bounds that keep the planner's arithmetic finite."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$"
# Upper bounds far above any real job, so that the planner's float arithmetic stays finite.
MAX_STEPS, MAX_EPOCHS, MAX_BATCH, MAX_CPUS, MAX_GPUS = 10**9, 10**6, 2**20, 1024, 64


class Strict(BaseModel):
    # No inf or nan anywhere: `cpus_per_worker: .inf` passes `gt=0` but no arithmetic after it.
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


def _patterns(value: list[str]) -> list[str]:
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"{pattern!r} is not a regular expression: {exc}") from None
    return value


# Regular expressions searched in parameter names (freeze, unfreeze, lr_groups).
Patterns = Annotated[list[str], Field(min_length=1), AfterValidator(_patterns)]


def _path(value: str) -> str:
    if not value.strip():
        raise ValueError("the path is empty; give a file, folder, glob or URI")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("a path cannot hold control characters (a newline, a NUL byte); fix the path")
    return value


# A file, folder, glob or URI: checked for what no filesystem accepts before it reaches one.
PathStr = Annotated[str, AfterValidator(_path)]
# What os.environ accepts on the cluster (a NUL byte or '=' in a name would fail there).
EnvName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
EnvValue = Annotated[str, Field(pattern=r"^[^\x00]*$")]
