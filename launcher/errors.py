"""The launcher's exceptions (defined in common/errors.py, shared with the cluster side)."""

from common.errors import (  # noqa: F401
    ClusterError,
    ConfigError,
    LauncherError,
    MissingExtraError,
    PlanError,
    SubmissionError,
)
