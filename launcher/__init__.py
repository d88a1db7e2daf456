"""ftlaunch client: spec -> plan -> submit -> status/logs/report. Imports no torch."""

from launcher.errors import (
    ClusterError,
    ConfigError,
    LauncherError,
    MissingExtraError,
    PlanError,
    SubmissionError,
)
from launcher.plan import JobPlan, plan
from launcher.spec import load_spec

__all__ = [
    "ClusterError",
    "ConfigError",
    "JobPlan",
    "LauncherError",
    "MissingExtraError",
    "PlanError",
    "SubmissionError",
    "load_spec",
    "plan",
]
