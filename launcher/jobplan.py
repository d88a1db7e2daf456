"""The pure plan: a validated spec and a target become a JobPlan. No network, no GPU, no writes.

`submit` consumes only a JobPlan, so what `ftlaunch plan` prints is exactly what runs.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel

import launcher
from launcher.errors import PlanError
from launcher.targets import get_target

PLAN_ENV = "FTLAUNCH_PLAN"
# Environment every job runs with: quiet Ray Data, no hub access, and a short Train health-check
# interval (ray.train.report blocks up to this long per call; the 2 s default dominates tiny jobs).
JOB_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}
PATH_FIELDS = ("data.train", "data.eval", "data.retain", "data.replay.path")


@dataclasses.dataclass(frozen=True)
class JobPlan:
    """Everything submit needs, and everything plan prints."""

    run_id: str
    submission_id: str
    kind: str
    name: str
    target: str
    entrypoint: str
    entrypoint_num_cpus: float
    runtime_env: dict
    resources: dict
    storage_path: str
    run_dir: str
    spec: dict
    warnings: list = dataclasses.field(default_factory=list)
    data: dict = dataclasses.field(default_factory=dict)  # role -> rows and files, from footers
    estimate: Optional[dict] = None  # the planner's parameter, memory, fit and time figures
    engine_config: Optional[dict] = None  # engine: deepspeed: the DeepSpeed config that runs

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "JobPlan":
        return cls(**data)


def make_run_id(name: str, spec: dict, now: Optional[dt.datetime] = None) -> str:
    """`<name>-<UTC time>-<spec hash>`: sortable, unique per submit, traceable to its spec."""
    now = now or dt.datetime.now(dt.timezone.utc)
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:6]
    return f"{name}-{now:%Y%m%d-%H%M%S}-{digest}"


def plan(
    spec: BaseModel,
    target: str = "local",
    *,
    submission_id: Optional[str] = None,
    base_dir: Optional[str] = None,
    now: Optional[dt.datetime] = None,
    profile: Optional[str] = None,
    preflight: bool = True,
) -> JobPlan:
    """Plan a validated spec for a target. Relative paths resolve against `base_dir` (the cwd).

    With `preflight`, datasets are checked from their footers and the job is estimated against
    `profile` (default: this machine for `local`); a job that cannot fit there is refused.
    """
    rules = get_target(target)  # the target's plan rules; an unknown name fails here
    base = Path(base_dir or rules.base_dir())
    resolved = spec.model_dump(mode="json")
    warnings = []
    for field in PATH_FIELDS:
        value = _get(resolved, field)
        if value is not None and not _is_uri(value):
            _set(resolved, field, str((base / value).resolve()) if not os.path.isabs(value) else value)
    if "tasks" in resolved:  # kind: multitask: every task's datasets
        from launcher import multitask

        multitask.resolve_paths(resolved, lambda v: v if _is_uri(v) else str((base / v).resolve()))
    for i, stage in enumerate(resolved.get("stages") or []):  # kind: pipeline, per-stage data
        for field in ("train", "eval", "retain"):
            value = (stage.get("data") or {}).get(field)
            if value is not None and not _is_uri(value) and not os.path.isabs(value):
                stage["data"][field] = str((base / value).resolve())
    model = resolved.get("model") or {}
    if model.get("source", "").startswith("hf:"):  # the job loads it from its own working dir
        folder = os.path.expanduser(model["source"][3:])
        model["source"] = "hf:" + (folder if os.path.isabs(folder) else str((base / folder).resolve()))
    storage = resolved["storage"]
    if _is_uri(storage):  # jobs/artifacts.py RunDir writes with local file I/O only
        raise PlanError(
            f"storage {storage}: a {storage.split('://')[0]}:// URI is not supported yet (run folders are "
            "written with local file I/O); use a folder, on a shared filesystem for a multi-node cluster"
        )
    storage = resolved["storage"] = str((base / storage).resolve())
    warnings += rules.check_storage(storage)
    for key, value in resolved.get("env", {}).items():  # secret references fit their target
        rules.check_env_ref(key, value)

    from launcher.dsconfig import prepare as prepare_engine

    engine_config = prepare_engine(resolved)  # lints the engine settings, fills their defaults
    data, estimate = {}, None
    if spec.kind == "finetune":
        from launcher.preflight import check_learning_rate

        warnings += check_learning_rate(resolved)
    if preflight:
        from launcher import preflight as checks

        warnings += checks.check_model(resolved, target)
        data, data_warnings = checks.check_data(resolved, target)
        warnings += data_warnings
        if profile is None:
            profile = rules.default_profile(resolved.get("resources", {}).get("gpus_per_worker", 0))
        estimate, fit_warnings = checks.check_fit(resolved, profile, strict=profile is not None)
        warnings += fit_warnings
    elif "tasks" in resolved:
        from launcher import multitask

        if multitask.missing_steps(resolved):
            raise PlanError(f"train.max_steps is not set for tasks {', '.join(multitask.missing_steps(resolved))} "
                            "and preflight is off: set it, or allow preflight")
        if resolved["packing"] == "auto":
            resolved["packing"] = False
            warnings.append("packing: auto -> false (preflight is off: nothing to decide on)")
    elif "stages" not in resolved and resolved.get("train", {}).get("max_steps") is None:
        raise PlanError("train.max_steps is not set and preflight is off: set it, or allow preflight")

    if submission_id is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}", submission_id):
        raise PlanError(
            f"submission id {submission_id!r} is invalid; use letters, digits, '-', '_' and '.'"
        )
    run_id = submission_id or make_run_id(spec.name, resolved, now)
    res = resolved.get("resources", {})
    if resolved.get("stages"):  # stages run one at a time: the job needs its largest stage's
        res = max((st["resources"] for st in resolved["stages"]),
                  key=lambda r: (r["workers"] * r["gpus_per_worker"], r["workers"] * r["cpus_per_worker"]))
    workers = res.get("workers", 1)
    if "tasks" in resolved:  # multitask: one worker per adapter, or one when packed
        from launcher import multitask

        workers = multitask.workers(resolved)
    resources = {
        "workers": workers,
        "cpus_per_worker": res.get("cpus_per_worker", 1),
        "gpus_per_worker": res.get("gpus_per_worker", 0),
        "total_cpus": workers * res.get("cpus_per_worker", 1),
        "total_gpus": workers * res.get("gpus_per_worker", 0),
    }
    if "tasks" in resolved:  # how many adapter workers run together (the rest wait their turn)
        resources["at_once"] = min(workers, ((estimate or {}).get("multitask") or {}).get("at_once", workers))
    job_plan_fields = dict(
        run_id=run_id,
        submission_id=run_id,
        kind=spec.kind,
        name=spec.name,
        target=target,
        # The spec travels in the runtime env, not on the command line: no spec field reaches a shell.
        entrypoint=f"python -m jobs.run --plan-env {PLAN_ENV}",
        # The driver only starts a Ray Train run; a CPU reserved for it would starve the workers.
        entrypoint_num_cpus=0,
        runtime_env={},
        resources=resources,
        storage_path=storage,
        run_dir=_join(storage, run_id),
        spec=resolved,
        warnings=warnings,
        data=data,
        engine_config=engine_config,
    )
    return with_runtime_env(JobPlan(**job_plan_fields), spec.env, estimate)


def with_runtime_env(draft: JobPlan, env: dict, estimate: Optional[dict] = None) -> JobPlan:
    """Attach the runtime env that carries the plan itself to the job (no shell involved)."""
    draft = dataclasses.replace(draft, runtime_env={}, estimate=None)
    # env:NAME references are resolved by the job from the cluster's own environment (see
    # jobs/logs.py): setting them here would hide the value they point at.
    env = {k: v for k, v in env.items() if not v.startswith("env:")}
    env = {**JOB_ENV, **env, PLAN_ENV: json.dumps(draft.to_dict(), sort_keys=True)}
    runtime_env = {"py_modules": package_dirs(), "env_vars": env}
    # The estimate stays out of the job's environment (it is large); the job needs none of it.
    return dataclasses.replace(draft, runtime_env=runtime_env, estimate=estimate)


def resume_plan(manifest: dict, target: str, attempt: int) -> JobPlan:
    """The plan that continues a stopped run: same run id and folder, a new submission id."""
    recorded = {**manifest["plan"], "spec": manifest["spec"]}
    fields = {f.name for f in dataclasses.fields(JobPlan)}
    old = JobPlan.from_dict({k: v for k, v in recorded.items() if k in fields})
    draft = dataclasses.replace(
        old, submission_id=f"{old.run_id}-resume{attempt}", target=target, warnings=[]
    )
    return with_runtime_env(draft, manifest["spec"].get("env", {}))


def package_dirs() -> list[str]:
    """The project's packages, shipped to the cluster so local and remote run the same code."""
    root = Path(launcher.__file__).resolve().parent.parent
    return [str(root / name) for name in ("common", "launcher", "jobs", "cluster")]


def _is_uri(value: str) -> bool:
    return "://" in value


def _join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


def _get(data: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(data, dict):
            return None
        data = data.get(part)
    return data


def _set(data: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        data = data[part]
    data[last] = value
