"""Secret references in a spec's `env:`: `env:NAME` (read from the cluster's environment by the
job) and `secret:NAME/KEY` (a Kubernetes Secret the pods mount). One parser for every side."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

ENV_PREFIX, SECRET_PREFIX = "env:", "secret:"
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Environment names that hold credentials: their values must be references, never literals.
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|ACCESS_?KEY|CREDENTIAL", re.I)


@dataclass(frozen=True)
class Ref:
    kind: str  # "env" | "secret"
    name: str  # the variable (env) or the Secret (secret)
    key: Optional[str] = None  # the Secret's key

    @property
    def target(self) -> str:
        """The target that resolves this kind of reference."""
        return "k8s" if self.kind == "secret" else "ray"


def parse(value: str) -> Optional[Ref]:
    """The reference a value holds, None for a literal; ValueError for a malformed reference."""
    value = str(value)
    if value.startswith(ENV_PREFIX):
        name = value[len(ENV_PREFIX):]
        if not ENV_NAME.fullmatch(name):
            raise ValueError(f"{value!r} is not env:NAME")
        return Ref("env", name)
    if value.startswith(SECRET_PREFIX):
        secret, sep, key = value[len(SECRET_PREFIX):].partition("/")
        if not sep or not secret or not key:
            raise ValueError(f"{value!r} is not secret:NAME/KEY (e.g. secret:hf-token/token)")
        return Ref("secret", secret, key)
    return None


def is_ref(value: str) -> bool:
    return str(value).startswith((ENV_PREFIX, SECRET_PREFIX))


def literals(env: dict) -> dict:
    """The entries of an env mapping that are plain values (references are resolved elsewhere)."""
    return {k: v for k, v in (env or {}).items() if not is_ref(v)}


def looks_secret(name: str) -> bool:
    return SECRET_NAME.search(name) is not None
