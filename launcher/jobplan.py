"""The pure plan: a validated spec and a target become a JobPlan. No network, no GPU, no writes.

`submit` consumes only a JobPlan, so what `ftlaunch plan` prints is exactly what runs.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import re
from pathlib import Path
from typing import Optional

from pydantic import BaseModel

import launcher
from launcher.errors import PlanError
from launcher.kinds import get_kind, path_resolver
from launcher.targets import get_target
from launcher.tracking import check_tracking

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
    kind = get_kind(spec.kind)
    resolved = spec.model_dump(mode="json")
    warnings = []

    # The target's rules: where relative paths point, the storage, env references, the profile.
    base = Path(base_dir or rules.base_dir())
    storage = resolved["storage"]
    if storage.startswith("file://"):
        storage = storage[len("file://"):]
    if _is_uri(storage):  # object storage: common/runstore.py
        warnings += check_remote_storage(storage, target, resolved.get("env", {}))
    else:
        storage = str((base / storage).resolve())
        warnings += rules.check_storage(storage)
    resolved["storage"] = storage
    for key, value in resolved.get("env", {}).items():  # secret references fit their target
        rules.check_env_ref(key, value)
    warnings += check_tracking(resolved["tracking"], target, resolved.get("env", {}))

    kind.resolve_paths(resolved, path_resolver(base))
    engine_config, lint = kind.prepare(resolved)  # lints the engine settings, fills their defaults
    warnings += lint
    data, estimate = {}, None
    if preflight:
        from launcher import preflight as checks

        datasets = [data for _, data in kind.datasets(spec)]
        written = list(kind.models(spec.model_dump(mode="json")).values())
        warnings += checks.check_model(list(kind.models(resolved).values()), target, datasets, written)
        data, data_warnings = kind.check_data(resolved, target)
        warnings += data_warnings
    # After the data (a missing dataset is missing on every target), before the estimate (a
    # model this target cannot run is refused for that, not for its memory).
    warnings += kind.check_target(resolved, target)
    if target == "k8s" and (resolved.get("resources") or {}).get("custom_per_worker"):
        raise PlanError("resources.custom_per_worker: the rendered RayCluster's pods have no custom "
                        "resources, so the job would wait for them forever; remove it for --target k8s")
    if preflight:
        if profile is None:
            profile = rules.default_profile(resolved.get("resources", {}).get("gpus_per_worker", 0))
        estimate, fit_warnings = kind.estimate(resolved, profile, strict=profile is not None)
        warnings += fit_warnings
    else:
        warnings += kind.without_preflight(resolved)

    if submission_id is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}", submission_id):
        raise PlanError(
            f"submission id {submission_id!r} is invalid; use letters, digits, '-', '_' and '.'"
        )
    run_id = submission_id or make_run_id(spec.name, resolved, now)
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
        resources=kind.resources(resolved, estimate),
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


# What a resume may change: how long it runs, how it reports, what it may retry or skip. The rest
# (the model, strategy, data, batch, resources) is what the run's checkpoints and data positions are of.
RESUMABLE = ("train.max_steps", "train.lr", "train.report_every", "train.eval_batches",
             "train.eval_generate", "train.max_failures", "data.skip_bad_rows", "pending_timeout", "env.*")


def resumed_spec(spec: dict, overrides: tuple[str, ...] = ()) -> dict:
    """The run's recorded spec with a resume's `key=value` overrides, validated; ConfigError for
    an override a resume cannot take, naming it and what a resume may change."""
    from launcher.errors import ConfigError
    from launcher.spec import _deep_copy, apply_override, validate

    fixed = [o.partition("=")[0] for o in overrides if not _resumable(o.partition("=")[0])]
    if fixed:
        raise ConfigError(f"resume cannot change {', '.join(fixed)}: the run's checkpoints are of its model, "
                          f"strategy, data and batch (submit a new run for that); a resume may change "
                          f"{', '.join(RESUMABLE)}")
    data = _deep_copy(spec)
    for item in overrides:
        apply_override(data, item, "resume")
    validate(data, "resume")
    return data


def _resumable(key: str) -> bool:
    return any(key == name or (name.endswith(".*") and key.startswith(name[:-1])) for name in RESUMABLE)


def resume_plan(manifest: dict, target: str, attempt: int, overrides: tuple[str, ...] = ()) -> JobPlan:
    """The plan that continues a stopped run: same run id and folder, a new submission id, and
    the spec with the overrides a resume may take (`RESUMABLE`)."""
    recorded = {**manifest["plan"], "spec": resumed_spec(manifest["spec"], overrides)}
    fields = {f.name for f in dataclasses.fields(JobPlan)}
    old = JobPlan.from_dict({k: v for k, v in recorded.items() if k in fields})
    draft = dataclasses.replace(
        old, submission_id=f"{old.run_id}-resume{attempt}", target=target, warnings=[]
    )
    return with_runtime_env(draft, draft.spec.get("env", {}))


def package_dirs() -> list[str]:
    """The project's packages, shipped to the cluster so local and remote run the same code."""
    root = Path(launcher.__file__).resolve().parent.parent
    return [str(root / name) for name in ("common", "launcher", "jobs", "cluster")]


def check_remote_storage(uri: str, target: str, env: dict) -> list[str]:
    """A run folder in object storage: the bucket opens and exists, seen from here (credentials
    from the environment; the cluster's nodes need them too). On Kubernetes the pods' credentials
    are Secrets (`env: AWS_*: secret:NAME/KEY`), and a bucket this machine cannot reach (an
    in-cluster endpoint) is a warning."""
    import pyarrow.fs as pafs

    from common.runstore import plain

    shown, warnings = plain(uri), []
    if target == "k8s" and uri.startswith("s3://") and not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env):
        warnings.append(f"storage {shown}: the pods get no S3 credentials from the spec; add env: "
                        "AWS_ACCESS_KEY_ID: secret:NAME/KEY and AWS_SECRET_ACCESS_KEY: secret:NAME/KEY "
                        "(or give the pods' service account a role that reaches the bucket)")
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except Exception as exc:  # unknown scheme, an option pyarrow does not take
        raise PlanError(f"storage {shown}: cannot open it ({exc}); fix the URI "
                        "(s3://bucket/prefix?endpoint_override=HOST:PORT&scheme=http for MinIO)") from None
    bucket = path.split("/", 1)[0]
    if not bucket:
        raise PlanError(f"storage {shown} names no bucket; use e.g. s3://bucket/runs")
    try:
        info = fs.get_file_info(bucket)
    except OSError as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        if target == "k8s":  # the endpoint may be the cluster's own (a MinIO service)
            return [*warnings, f"storage {shown}: the bucket {bucket} is not reachable from here ({reason}); "
                    "not checked before submit, and ftlaunch status and report need it from here"]
        raise PlanError(f"storage {shown}: cannot reach the bucket {bucket} ({reason}); check the endpoint "
                        "and the AWS_* credentials in this environment and the cluster's") from None
    if info.type == pafs.FileType.NotFound:
        raise PlanError(f"storage {shown}: the bucket {bucket} does not exist; create it or fix the URI")
    return warnings


def _is_uri(value: str) -> bool:
    return "://" in value


def _join(base: str, name: str) -> str:
    from common.runstore import join

    return join(base, name)  # a URI keeps its ?options after the run id
