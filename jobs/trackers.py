"""The trackers jobs/tracking.py feeds: MLflow (through MlflowClient, no global state) and W&B.

Each keeps its ids in `state` (the manifest's `tracking.<name>`): the run's, its experiment's,
and one per child curve. `open` starts the run or, with ids there, continues it; `log` adds
metrics records at their steps; `close` logs the summary and the artifacts and ends the run.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path
from typing import Optional

MLFLOW_STATUS = {"SUCCEEDED": "FINISHED", "FAILED": "FAILED", "STOPPED": "KILLED"}
MAX_PARAM_VALUE = 6000  # MLflow's limit on a param's value


def numeric(record: dict) -> dict[str, float]:
    """A record's metrics: its numbers but the step and the wall time (the x and the timestamp)."""
    return {k: float(v) for k, v in record.items()
            if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)}


def flatten(tree: dict, prefix: str = "") -> dict:
    """`{"train": {"lr": 1e-4}}` -> `{"train.lr": 1e-4}`; lists stay values."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def artifact_entries(folder: Path) -> list[Path]:
    """What of a finished run folder is logged: its exports (adapter/, model/, merged/, a
    multitask's adapters, a compare's variants), the report, the manifest, metrics and logs;
    not Ray Train's checkpoints, progress files, hidden marks, or the trackers' own files."""
    skipped = {"tensorboard", "wandb"}
    return [p for p in sorted(folder.iterdir())
            if p.name not in skipped and not p.name.startswith((".", "checkpoint_"))]


def _tree_files(entry: Path) -> list[Path]:
    if entry.is_file():
        return [entry]
    return [f for f in sorted(entry.rglob("*")) if f.is_file()
            and not any(part.startswith((".", "checkpoint_")) for part in f.relative_to(entry).parts)]


class Mlflow:
    name = "mlflow"

    def __init__(self, config: dict, state: dict, folder: Path):
        from mlflow import MlflowClient

        self.config, self.state = config, state
        self.client = MlflowClient(tracking_uri=config["uri"])

    def open(self, run: dict) -> None:
        c, state = self.client, self.state
        if not state.get("experiment_id"):
            experiment = c.get_experiment_by_name(self.config["experiment"])
            state["experiment_id"] = (experiment.experiment_id if experiment
                                      else c.create_experiment(self.config["experiment"]))
        if state.get("run_id"):  # a resume: the same run goes on
            c.update_run(state["run_id"], status="RUNNING")
        else:
            created = c.create_run(state["experiment_id"], run_name=run["run_id"],
                                   tags={"ftlaunch.run_id": run["run_id"], "ftlaunch.kind": run["kind"]})
            state["run_id"] = created.info.run_id
            self._params(run["params"])
        c.set_tag(state["run_id"], "ftlaunch.attempts", str(run["attempt"]))
        self.parent = run["run_id"]

    def _params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, (v if isinstance(v, str) else json.dumps(v))[:MAX_PARAM_VALUE])
                 for k, v in sorted(params.items()) if v is not None]
        for i in range(0, len(items), 100):  # MLflow's batch limit on params
            self.client.log_batch(self.state["run_id"], params=items[i:i + 100])

    def _run_of(self, curve: str) -> str:
        if not curve:
            return self.state["run_id"]
        children = self.state.setdefault("children", {})
        if curve not in children:
            created = self.client.create_run(
                self.state["experiment_id"], run_name=f"{self.parent}/{curve}",
                tags={"mlflow.parentRunId": self.state["run_id"], "ftlaunch.run_id": self.parent,
                      "ftlaunch.curve": curve})
            children[curve] = created.info.run_id
        return children[curve]

    def log(self, curve: str, records: list[dict]) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(key, value, int(r["time"] * 1000), int(r["step"]))
                   for r in records for key, value in numeric(r).items()]
        run = self._run_of(curve)
        for i in range(0, len(metrics), 1000):  # MLflow's batch limit on metrics
            self.client.log_batch(run, metrics=metrics[i:i + 1000])

    def close(self, status: str, summary: Optional[dict], folder: Optional[Path]) -> None:
        from mlflow.entities import Metric

        c, run = self.client, self.state["run_id"]
        if summary:
            now = int(time.time() * 1000)
            values = [Metric(f"summary.{k}", v, now, 0) for k, v in numeric(flatten(summary)).items()]
            if values:
                c.log_batch(run, metrics=values[:1000])
            c.log_dict(run, summary, "summary.json")
        if folder is not None and self.config.get("log_artifacts", True):
            for entry in artifact_entries(folder):
                for f in _tree_files(entry):
                    where = f.parent.relative_to(folder).as_posix()
                    c.log_artifact(run, str(f), artifact_path=None if where == "." else where)
        for child in self.state.get("children", {}).values():
            c.set_terminated(child, MLFLOW_STATUS[status])
        c.set_terminated(run, MLFLOW_STATUS[status])


def wandb_id(*parts: str) -> str:
    """A W&B run id from ftlaunch names: letters, digits, '-' and '_', at most 64 characters."""
    text = re.sub(r"[^A-Za-z0-9_-]", "-", "-".join(parts))
    if len(text) > 64:
        text = text[:55] + "-" + hashlib.sha1(text.encode()).hexdigest()[:8]
    return text


class Wandb:
    name = "wandb"

    def __init__(self, config: dict, state: dict, folder: Path):
        import wandb  # noqa: F401  (missing: the tracker's warning)

        self.config, self.state, self.folder = config, state, folder
        self.runs: dict = {}
        self.done: dict = {}  # curve -> the last step this run has durably (on W&B's side or on disk)
        # W&B logs asynchronously: a row it was given may never reach its file or server (the
        # driver killed at a stop). So each attempt starts from what W&B has, not from a count.
        state["logged"] = {}

    def _init(self, curve: str, run_id: str, name: str, job_type: str, config: Optional[dict] = None):
        import wandb

        from jobs.wandbfile import last_step

        settings = wandb.Settings(console="off", silent=True, save_code=False, disable_git=True,
                                  x_disable_stats=True)
        run = wandb.init(project=self.config["project"], entity=self.config.get("entity"),
                         mode=self.config["mode"], dir=str(self.folder), id=run_id, name=name,
                         group=self.group, job_type=job_type, config=config, resume="allow",
                         reinit="create_new", settings=settings)
        # Online: the server's next step for a resumed run; offline: the rows in its earlier files.
        online = (getattr(run, "step", 0) or 0) - 1
        self.done[curve] = max(online, last_step(self.folder, run_id) if self.config["mode"] == "offline" else -1)
        return run

    def open(self, run: dict) -> None:
        self.group = run["run_id"]
        self.state.setdefault("run_id", wandb_id(run["run_id"]))
        self.runs[""] = self._init("", self.state["run_id"], run["run_id"], run["kind"], config=run["spec"])

    def _run_of(self, curve: str):
        if curve not in self.runs:
            children = self.state.setdefault("children", {})
            children.setdefault(curve, wandb_id(self.state["run_id"], curve))
            self.runs[curve] = self._init(curve, children[curve], f"{self.group}/{curve}", curve)
        return self.runs[curve]

    def log(self, curve: str, records: list[dict]) -> None:
        run = self._run_of(curve)
        for r in records:
            if int(r["step"]) > self.done[curve]:  # W&B's steps only go up: a row it has is not sent again
                run.log(numeric(r), step=int(r["step"]))
                self.done[curve] = int(r["step"])

    def close(self, status: str, summary: Optional[dict], folder: Optional[Path]) -> None:
        import wandb

        main = self.runs[""]
        if summary:
            main.summary.update(summary)
        if folder is not None and self.config.get("log_artifacts", True):
            entries = artifact_entries(folder)
            if entries:
                artifact = wandb.Artifact(self.state["run_id"], type="model")
                for entry in entries:
                    if entry.is_dir():
                        artifact.add_dir(str(entry), name=entry.name)
                    else:
                        artifact.add_file(str(entry), name=entry.name)
                main.log_artifact(artifact)
        code = 0 if status == "SUCCEEDED" else 1
        for curve, run in list(self.runs.items()):
            if curve:
                run.finish(exit_code=code)
        main.finish(exit_code=code)


TRACKERS = {"mlflow": Mlflow, "wandb": Wandb}
