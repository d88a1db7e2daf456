"""Where a job runs: one registered object per target, carrying everything the rest of the code
asks about it: its plan rules (where relative paths resolve, how storage is checked, which env
references it resolves, its default profile) and its job verbs (submit, attach, list).

`plan()`, `launcher.client` and the CLI consult `get_target(name)` and never test target names.
A new target = one module here that calls `register_target` (and its import at the bottom).
"""

from __future__ import annotations

import abc
import difflib
from pathlib import Path
from typing import Callable, Optional

from common import refs
from common.registry import add, import_package_modules
from common.runfolder import MANIFEST, read_json
from common.runstore import local_run
from launcher.errors import PlanError


class Handle(abc.ABC):
    """A submitted job, whatever runs it. `submission_id` is what status/logs/stop take."""

    submission_id: str
    run_dir: Optional[str]
    follows: bool = True  # whether `ftlaunch submit` tails it by default

    @abc.abstractmethod
    def status(self) -> str: ...

    @abc.abstractmethod
    def logs(self) -> str: ...

    @abc.abstractmethod
    def wait(self, timeout: Optional[float] = None,
             on_logs: Optional[Callable[[str], None]] = None) -> str: ...

    @abc.abstractmethod
    def stop(self) -> bool:
        """Ask for the job to stop; False when it was not running."""

    @abc.abstractmethod
    def row(self) -> dict:
        """The job's state as `ftlaunch status --json` prints it (always with a `message`)."""

    @abc.abstractmethod
    def format_row(self, row: dict) -> list[str]:
        """`row` as the lines `ftlaunch status` prints."""

    @abc.abstractmethod
    def submitted_lines(self) -> list[str]:
        """What `ftlaunch submit` says once the job is handed over: where, and the next commands."""

    def detached_lines(self) -> list[str]:
        """What `ftlaunch submit` says when Ctrl-C leaves the job running: how to follow or stop it."""
        return [f"{self.submission_id} is still running; follow it with: ftlaunch status {self.submission_id}"]

    def manifest(self) -> dict:
        """The run folder's manifest, when this machine can read it; {} otherwise."""
        if not self.run_dir:
            return {}
        try:
            return read_json(local_run(self.run_dir, only=(MANIFEST,)) / MANIFEST)
        except ValueError:
            return {}


class Target(abc.ABC):
    name: str
    help: str

    # Plan rules, used by launcher/jobplan.plan(); pure: no network.
    @abc.abstractmethod
    def base_dir(self) -> Path:
        """Where a spec's relative paths resolve."""

    @abc.abstractmethod
    def check_storage(self, path: str) -> list[str]:
        """Raise PlanError for a storage folder that cannot hold a run; else return warnings."""

    @abc.abstractmethod
    def check_env_ref(self, key: str, value: str) -> None:
        """Raise PlanError for an `env:` value whose reference kind this target cannot resolve."""

    def default_profile(self, gpus_per_worker: float) -> Optional[str]:
        """The profile a plan is fitted against when none is given (None: fit is only advised)."""
        return None

    # Job verbs. Options a target does not use (another target's flags) are ignored.
    @abc.abstractmethod
    def submit(self, plan, *, address: Optional[str] = None, **options) -> Handle: ...

    @abc.abstractmethod
    def attach(self, job_id: str, address: Optional[str] = None, **options) -> Handle: ...

    @abc.abstractmethod
    def list(self, address: Optional[str] = None, **options) -> list[dict]:
        """Jobs on the cluster, oldest first: submission_id, status, kind, name, run_dir, message."""


_REGISTRY: dict[str, Target] = {}


def register_target(target: Target) -> Target:
    return add(_REGISTRY, target.name, target, "target")


def get_target(name: str) -> Target:
    if name not in _REGISTRY:
        hint = difflib.get_close_matches(str(name), _REGISTRY, n=1)
        fix = f"did you mean {hint[0]!r}?" if hint else f"use one of: {', '.join(_REGISTRY)}"
        raise PlanError(f"target {name!r} is unknown; {fix}")
    return _REGISTRY[name]


def env_ref(key: str, value: str) -> Optional[refs.Ref]:
    """The reference `env.<key>` holds (None for a literal); PlanError when it is malformed."""
    try:
        return refs.parse(value)
    except ValueError as exc:
        raise PlanError(f"env.{key}: {exc}") from None


def describe_targets() -> str:
    return "; ".join(f"{t.name}: {t.help}" for t in _REGISTRY.values())


# Every file of this package registers its targets on import (ray.py registers local, then ray).
import_package_modules(__name__, __path__, first=("ray", "k8s"))

TARGETS = tuple(_REGISTRY)
