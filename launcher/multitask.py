"""Client side of `kind: multitask`: each task's effective settings, its data checks and steps,
and the planner's choice between one base per worker and packed adapters on one base.

Shared with the job (jobs/multitask.py reads `typed_task_settings`), so both see the same merge.
"""

from __future__ import annotations

import os
from typing import Optional

from pydantic import BaseModel

from launcher.errors import MissingExtraError, PlanError
from launcher.spec import DataSpec, LoraStrategy, MultitaskSpec, TaskSpec, TrainSpec

DATA_ROLES = ("train", "eval")


def task_settings(spec: dict, task: dict) -> dict:
    """A task's effective LoRA and train settings: the spec's, overridden by the task's."""
    lora = {**spec["strategy"], **{k: v for k, v in task.get("lora", {}).items() if v is not None}}
    train = {**spec["train"], **{k: v for k, v in task.get("train", {}).items() if v is not None}}
    return {"name": task["name"], "data": task["data"], "lora": lora, "train": train}


class TaskSettings(BaseModel):
    """One task's effective settings as typed spec parts: what an adapter worker trains by."""

    name: str
    data: DataSpec
    lora: LoraStrategy
    train: TrainSpec


def typed_task_settings(spec: MultitaskSpec, task: TaskSpec) -> TaskSettings:
    """`task_settings` on the typed spec: the spec's LoRA and train, overridden by the task's
    (the overrides were validated with the task)."""
    return TaskSettings(
        name=task.name, data=task.data,
        lora=spec.strategy.model_copy(update=task.lora.model_dump(exclude_none=True)),
        train=spec.train.model_copy(update=task.train.model_dump(exclude_none=True)))


def resolve_paths(spec: dict, resolve) -> None:
    """Make each task's dataset paths absolute in place (`resolve` maps one path)."""
    for task in spec.get("tasks") or []:
        for role in DATA_ROLES:
            if task["data"].get(role) is not None:
                task["data"][role] = resolve(task["data"][role])


def missing_steps(spec: dict) -> list[str]:
    """Tasks whose step count is neither set nor countable without preflight."""
    return [t["name"] for t in spec["tasks"] if task_settings(spec, t)["train"].get("max_steps") is None]


def check_data(spec: dict, target: str = "local") -> tuple[dict, list[str]]:
    """Footer checks of every task's datasets; fills each task's `train.max_steps` when unset.

    Returns `{"<task>.<role>": {"rows", "files"}}` and warnings, each naming its task.
    """
    from launcher.datacheck import check_dataset, steps_for, sufficiency

    found, warnings = {}, []
    for task in spec["tasks"]:
        name, data = task["name"], task["data"]
        settings = task_settings(spec, task)
        for role in DATA_ROLES:
            path = data.get(role)
            if not path:
                continue
            if target != "local" and "://" not in path and not os.path.exists(path):
                warnings.append(f"tasks.{name}.data.{role}: {path} is not visible here; not checked")
                continue
            try:
                info = check_dataset(path, data["task"], role=role, columns=data.get("columns"))
            except Exception as exc:  # name the task: several tasks may share a role name
                raise type(exc)(f"tasks.{name}: {exc}") from None
            found[f"{name}.{role}"] = {"rows": info.rows, "files": info.files}
        rows = found.get(f"{name}.train", {}).get("rows")
        if rows is None:
            if settings["train"].get("max_steps") is None:
                raise PlanError(f"tasks.{name}.train.max_steps is needed: its train rows cannot be "
                                "counted from here")
            continue
        warnings += [f"tasks.{name}: {w}" for w in
                     sufficiency(data["task"], rows, peft=True, force=data.get("force", False))]
        if settings["train"].get("max_steps") is None:
            train = settings["train"]
            task.setdefault("train", {})["max_steps"] = steps_for(
                rows, train["epochs"], train["micro_batch"], 1)
    return found, warnings


def _task_spec(spec: dict, task: dict, workers: int = 1) -> dict:
    """The finetune-shaped spec of one adapter worker, for the estimator."""
    s = task_settings(spec, task)
    return {"kind": "finetune", "model": spec["model"], "strategy": s["lora"], "train": s["train"],
            "resources": {**spec["resources"], "workers": workers}}


def check_fit(spec: dict, profile: Optional[str], strict: bool) -> tuple[Optional[dict], list[str]]:
    """Estimate one adapter worker per task and the packed alternative; resolve `packing: auto`.

    The estimate returned is the largest adapter worker's (the shape `format_estimate` prints),
    with a `multitask` section: each task's memory, both layouts' totals, and the choice made.
    """
    try:
        from launcher.estimate import estimate, fit, memory_per_gpu
    except MissingExtraError as exc:
        return None, _unestimated(spec, exc)
    k = len(spec["tasks"])
    at_once, warnings = schedule(spec, profile, strict)
    try:
        per_task = {t["name"]: estimate(_task_spec(spec, t, workers=at_once), profile) for t in spec["tasks"]}
    except MissingExtraError as exc:
        return None, _unestimated(spec, exc)
    largest = max(per_task.values(), key=lambda e: e["memory"]["total"])
    # Packed: the base's weights once; every adapter's gradients and optimizer states; the
    # activations of all tasks' micro-batches together (one forward over the packed batch).
    counts = {**largest["parameters"], "trainable": sum(e["parameters"]["trainable"] for e in per_task.values())}
    settings = largest["memory_settings"]
    micro = sum(task_settings(spec, t)["train"]["micro_batch"] for t in spec["tasks"])
    packed_mem = memory_per_gpu(counts, None, "lora", workers=1, micro_batch=micro,
                                seq_len=settings["seq_len"], precision=settings["precision"])
    packed_mem = {k_: v for k_, v in packed_mem.items() if k_ != "inputs"}
    one_worker = {**spec["resources"], "workers": 1}
    packed_fit = fit(packed_mem, largest["profile"], one_worker)
    separate_fit = largest["fit"]
    separate_total = sum(e["memory"]["total"] for e in per_task.values())

    choice = spec["packing"]
    if choice == "auto":
        too_few = at_once < k  # the workers would run in waves
        choice = (separate_fit["verdict"] != "fits" or too_few) and packed_fit["verdict"] == "fits"
        spec["packing"] = choice
        if separate_fit["verdict"] != "fits":
            why = f"one base per worker does not fit ({separate_fit['reason']})"
        elif too_few:
            why = f"only {at_once} of the {k} adapter workers run at once"
        else:
            why = "one base per worker fits, all at once"
        why += "; packed fits" if choice else ""
        if choice:
            warnings = [w for w in warnings if "waves" not in w]
        warnings.append(f"packing: auto -> {str(choice).lower()}: {why}")
    chosen = packed_fit if choice else separate_fit
    if chosen["verdict"] != "fits":
        layout = f"{k} adapters packed on one base" if choice else f"{k} adapter workers"
        fixes = [] if choice or packed_fit["verdict"] != "fits" else ["packing: true"]
        fixes += [s.get("change", str(s)) for s in chosen.get("suggestions", [])]
        fix = f"; would fit: {'; '.join(fixes)}" if fixes else ""
        message = f"{layout}: {chosen['verdict']} on profile {chosen['profile']}: {chosen['reason']}{fix}"
        if strict:
            raise PlanError(message)
        warnings.append(message)
    largest = {**largest, "multitask": {
        "tasks": {n: {"trainable": e["parameters"]["trainable"], "memory_total": e["memory"]["total"],
                      "time_s": (e.get("time") or {}).get("seconds")} for n, e in per_task.items()},
        "separate_total_bytes": separate_total,
        "packed_total_bytes": packed_mem["total"],
        "packed_vs_separate": packed_mem["total"] / max(separate_total, 1),
        "packing": choice,
        "at_once": 1 if choice else at_once,
        "packed_fit": packed_fit["verdict"],
        "separate_fit": separate_fit["verdict"],
    }}
    return largest, warnings


def schedule(spec: dict, profile: Optional[str], strict: bool) -> tuple[int, list[str]]:
    """How many adapter workers the profile runs at once, each with its data stream's CPUs.

    A worker that fits nowhere would wait forever: refused (strict) or warned. More workers than
    the profile holds run in waves, each starting as an earlier one ends.
    """
    from cluster import profiles as cluster_profiles
    from launcher.estimate import capacity, schedule_problem

    res = spec["resources"]
    cpus, gpus = res["cpus_per_worker"], res["gpus_per_worker"]
    data_cpus = res.get("data_cpus_per_worker", 0.2)
    prof = cluster_profiles.get_profile(profile or ("a100-80g-1" if gpus > 0 else "local-cpu"))
    slot = {"workers": 1, "cpus_per_worker": cpus + data_cpus, "gpus_per_worker": gpus}
    problem = schedule_problem(prof, slot)
    if problem:
        message = (f"an adapter worker ({cpus:g} CPU + {data_cpus:g} CPU for its data stream, {gpus:g} GPU) "
                   f"cannot be placed: {problem}; lower resources.cpus_per_worker or "
                   "resources.data_cpus_per_worker")
        if strict:
            raise PlanError(message)
        return 1, [message]
    k = workers(spec)
    at_once = min(k, capacity(prof, slot))
    if at_once >= k:
        return k, []
    waves = -(-k // at_once)
    return at_once, [f"{k} adapter workers x ({cpus + data_cpus:g} CPU, {gpus:g} GPU): {prof['name']} holds "
                     f"{at_once} at a time, so they run in {waves} waves"]


def _unestimated(spec: dict, exc: Exception) -> list[str]:
    warnings = [f"no parameter or memory estimate: {exc}"]
    if spec["packing"] == "auto":
        spec["packing"] = False
        warnings.append("packing: auto -> false (no estimate to decide on)")
    return warnings


def workers(spec: dict) -> int:
    """Ray workers the job holds at most: one per task, or one when packed."""
    return 1 if spec.get("packing") is True else len(spec["tasks"])


def describe(spec: dict, estimate: Optional[dict]) -> list[str]:
    """Plan lines for `ftlaunch plan`: one per task, then the layout."""
    lines = []
    for task in spec["tasks"]:
        s = task_settings(spec, task)
        lines.append(f"task          {s['name']}: {s['data']['task']}, lora r={s['lora']['r']}, "
                     f"{s['train'].get('max_steps')} steps x {s['train']['micro_batch']}")
    mt = (estimate or {}).get("multitask")
    res = spec["resources"]
    per_worker = f"{res['cpus_per_worker']:g} CPU + {res.get('data_cpus_per_worker', 0.2):g} CPU for its data stream"
    if spec.get("packing") is True:
        layout = f"packed on one base, one worker ({per_worker})"
    else:
        k, at_once = len(spec["tasks"]), ((estimate or {}).get("multitask") or {}).get("at_once")
        together = f", {at_once} at a time" if at_once and at_once < k else ", all at once"
        layout = f"one worker per adapter ({per_worker}){together if at_once else ''}"
    lines.append(f"layout        {layout}")
    if mt:
        lines.append(f"memory        one base per worker {_gib(mt['separate_total_bytes'])} in all, "
                     f"packed {_gib(mt['packed_total_bytes'])} ({mt['packed_vs_separate']:.2f}x)")
    return lines


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"
