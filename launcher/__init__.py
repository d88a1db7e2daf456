"""ftlaunch client: spec -> plan -> submit -> status/logs/report. Imports no torch.

The public API is loaded on first use (PEP 562), so that `import launcher.spec` (which the
cluster side does for the spec models) does not load the planner, the client or the report.
"""

from __future__ import annotations

import importlib

_API = {
    "ClusterError": "launcher.errors",
    "ConfigError": "launcher.errors",
    "LauncherError": "launcher.errors",
    "MissingExtraError": "launcher.errors",
    "PlanError": "launcher.errors",
    "SubmissionError": "launcher.errors",
    "JobHandle": "launcher.client",
    "attach": "launcher.client",
    "list_jobs": "launcher.client",
    "list_runs": "launcher.client",
    "resume": "launcher.client",
    "run_status": "launcher.client",
    "submit": "launcher.client",
    "JobPlan": "launcher.jobplan",
    "plan": "launcher.jobplan",
    "write_report": "launcher.report",
    "load_spec": "launcher.spec",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'launcher' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
