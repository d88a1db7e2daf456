"""`tracking:` in a spec: the run in MLflow and/or Weights & Biases, and its checks at plan.

The job logs (jobs/tracking.py); the client only checks, before any GPU time is spent, that the
tracker's package is there and its server answers. Credentials come from the cluster's
environment only (MLFLOW_TRACKING_TOKEN / _USERNAME / _PASSWORD, WANDB_API_KEY, as `env:`
references): a URI holding a password is refused, as it would be written to the manifest.
"""

from __future__ import annotations

import importlib.util
import urllib.error
import urllib.parse
import urllib.request
from typing import Literal, Optional

from pydantic import Field, field_validator

from launcher.errors import PlanError
from launcher.fields import Strict

MLFLOW_SCHEMES = ("http", "https", "file", "sqlite", "postgresql", "mysql", "mssql", "databricks", "databricks-uc")
INSTALL = "pip install 'ftlaunch[tracking]' (on the cluster's nodes too)"


class MlflowTracking(Strict):
    uri: str = Field(description="the tracking server: http(s)://HOST:PORT, or a file: or database store "
                     "the driver's node reaches")
    experiment: str = Field("ftlaunch", min_length=1, description="the experiment the run goes in (made if missing)")
    log_artifacts: bool = Field(True, description="log the export (adapter or model), the report and the summary")

    @field_validator("uri")
    @classmethod
    def _no_credentials(cls, uri: str) -> str:
        parts = urllib.parse.urlsplit(uri)
        if parts.password or (parts.username and parts.scheme.startswith("http")):
            raise ValueError(
                f"{parts.scheme}://{parts.hostname}... holds a user name or password, which would be written to the "
                "manifest; put them in MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (env: references)")
        if parts.scheme.split("+")[0] not in MLFLOW_SCHEMES:
            raise ValueError("names no scheme MLflow takes; use http://HOST:PORT (an MLflow server), "
                             "file:///PATH or a database URI (sqlite:///PATH, postgresql://...)")
        return uri


class WandbTracking(Strict):
    project: str = Field(min_length=1, description="the W&B project")
    entity: Optional[str] = Field(None, description="the W&B team or user (default: the API key's)")
    mode: Literal["online", "offline", "disabled"] = Field(
        "online", description="offline: the run's files go to <run>/wandb/, for `wandb sync` later")
    log_artifacts: bool = Field(True, description="log the export (adapter or model) and the report as artifacts")


class Tracking(Strict):
    mlflow: Optional[MlflowTracking] = None
    wandb: Optional[WandbTracking] = None


def check_tracking(tracking: dict, target: str, env: dict) -> list[str]:
    """The trackers' packages and servers, seen from here. On the embedded head this machine is
    the cluster: a missing package or a server that does not answer is refused. Elsewhere the
    nodes have their own packages and network (an in-cluster server): a warning."""
    warnings: list[str] = []

    def problem(line: str) -> None:
        if target == "local":
            raise PlanError(line)
        warnings.append(line + " (not checked on the cluster)")

    for name in ("mlflow", "wandb"):
        if tracking.get(name) and importlib.util.find_spec(name) is None:
            problem(f"tracking.{name}: the {name} package is not installed here; {INSTALL}")
    mlflow = tracking.get("mlflow")
    if mlflow and mlflow["uri"].startswith(("http://", "https://")):
        reason = _unreachable(mlflow["uri"])
        if reason:
            problem(f"tracking.mlflow.uri {mlflow['uri']} does not answer ({reason}); start the server "
                    "or fix the URI")
    wandb = tracking.get("wandb")
    if wandb and wandb["mode"] == "online" and "WANDB_API_KEY" not in env:
        warnings.append("tracking.wandb: mode online and no env: WANDB_API_KEY: env:WANDB_API_KEY in the spec; "
                        "the job needs W&B credentials on the cluster (or use mode: offline)")
    return warnings


def _unreachable(uri: str) -> Optional[str]:
    """None when an MLflow server answers at `uri`, else why not. Any HTTP answer counts (a 401
    is a server that wants the cluster's credentials)."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5):
            return None
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return str(getattr(exc, "reason", exc))[:200]


def describe(tracking: dict) -> list[str]:
    """The plan's lines for the trackers."""
    lines = []
    if tracking.get("mlflow"):
        m = tracking["mlflow"]
        lines.append(f"tracking      mlflow {m['uri']} experiment {m['experiment']}")
    if tracking.get("wandb"):
        w = tracking["wandb"]
        where = f"{w['entity']}/{w['project']}" if w.get("entity") else w["project"]
        lines.append(f"tracking      wandb {where} ({w['mode']})")
    return lines
