"""ftlaunch client: spec -> plan -> submit -> status/logs/report. Imports no torch."""

from launcher.errors import (
    ClusterError,
    ConfigError,
    LauncherError,
    MissingExtraError,
    PlanError,
    SubmissionError,
)
from launcher.client import JobHandle, attach, list_jobs, resume, submit
from launcher.plan import JobPlan, plan
from launcher.report import write_report
from launcher.spec import load_spec

__all__ = [
    "ClusterError",
    "ConfigError",
    "JobHandle",
    "JobPlan",
    "LauncherError",
    "MissingExtraError",
    "PlanError",
    "SubmissionError",
    "attach",
    "list_jobs",
    "load_spec",
    "plan",
    "resume",
    "submit",
    "write_report",
]
