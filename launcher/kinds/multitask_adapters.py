"""`kind: multitask` in `mode: adapters` at plan time: whether one adapter worker per task fits,
or the packed layout (all adapters on one shared base in one worker) does, resolving `packing:
auto`; and how many adapter workers the profile runs at once. The kind
(launcher/kinds/multitask.py) calls these."""

from __future__ import annotations

from typing import Optional

from launcher.errors import MissingExtraError, PlanError

MULTITASK_IGNORES = ("train.precision", "train.grad_accumulation", "train.grad_checkpointing",
                     "model.attn_implementation")  # the torch engine's step settings, not run here
# mode adapters runs gradient checkpointing (both layouts): on a large base it keeps the
# activations from hiding what packing shares, the base's weights; and train.precision (bf16
# autocast, a 16-bit frozen base on GPUs; fp16 is refused: its steps have no loss scaler).
ADAPTER_IGNORES = tuple(f for f in MULTITASK_IGNORES if f not in ("train.grad_checkpointing", "train.precision"))


def task_settings(spec: dict, task: dict) -> dict:
    """A task's effective LoRA and train settings: the spec's, overridden by the task's."""
    lora = {**spec["strategy"], **{k: v for k, v in task.get("lora", {}).items() if v is not None}}
    train = {**spec["train"], **{k: v for k, v in task.get("train", {}).items() if v is not None}}
    return {"name": task["name"], "data": task["data"], "lora": lora, "train": train}


def packing_problem(spec: dict) -> Optional[str]:
    """Why the packed engine (jobs/packed_lora.py) cannot train these tasks together, or None:
    it stacks one equal micro-batch per adapter and has no dropout."""
    settings = [task_settings(spec, t) for t in spec["tasks"]]
    for s in settings:
        if s["lora"].get("dropout"):
            return (f"tasks.{s['name']}: packed training needs lora dropout 0 (got {s['lora']['dropout']}); "
                    "set strategy.dropout: 0")
    micro = {s["name"]: s["train"]["micro_batch"] for s in settings}
    if len(set(micro.values())) > 1:
        shown = ", ".join(f"{n} {m}" for n, m in micro.items())
        return f"packed training needs one equal train.micro_batch for every task (got {shown}); set one value"
    return None


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
        from launcher.planner import estimate, fit, memory_per_gpu
        from launcher.planner.fit import STAGE_LEVERS
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
                                seq_len=settings["seq_len"], precision=settings["precision"],
                                grad_checkpointing=settings["grad_checkpointing"])
    one_worker = {**spec["resources"], "workers": 1}
    # The packed batch is the sum of the tasks' micro-batches: no one spec field sets it, so only
    # another profile is suggested for it (the fit re-measures from the memory's inputs).
    packed_fit = fit(packed_mem, largest["profile"], one_worker, STAGE_LEVERS)
    packed_mem = {k_: v for k_, v in packed_mem.items() if k_ != "inputs"}
    separate_fit = largest["fit"]
    separate_total = sum(e["memory"]["total"] for e in per_task.values())

    choice = spec["packing"]
    if choice == "auto":
        choice, why = auto_packing(spec, k, at_once, separate_fit, packed_fit,
                                   packed_mem["total"] / max(separate_total, 1))
        spec["packing"] = choice
        if choice:
            warnings = [w for w in warnings if "waves" not in w]
        warnings.append(f"packing: auto -> {str(choice).lower()}: {why}")
    chosen = packed_fit if choice else separate_fit
    if chosen["verdict"] != "fits":
        layout = f"{k} adapters packed on one base" if choice else f"{k} adapter workers"
        fixes = [] if choice or packed_fit["verdict"] != "fits" else ["packing: true"]
        # The finetune planner's fixes that a multitask spec can take, with their overrides.
        fixes += [f"{s['change']}: {s['args']}" for s in chosen.get("suggestions", [])
                  if not any(o.split("=")[0] in ADAPTER_IGNORES for o in s.get("overrides", []))]
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


def auto_packing(spec: dict, k: int, at_once: int, separate_fit: dict, packed_fit: dict,
                 ratio: float) -> tuple[bool, str]:
    """`packing: auto`: pack only where the estimate says the pack wins, and say why.

    It wins where one base per worker does not fit, or where the workers would run in waves
    (the pack runs every adapter at once, on one base's memory). Where K separate workers fit
    and run at once, they are kept: the pack's memory is smaller (`ratio` of theirs), but it does
    the K workers' compute in one worker, which measured slower on CPU than K parallel workers
    (bench B5, README)."""
    problem = packing_problem(spec)
    if problem:
        return False, f"the packed engine cannot run these tasks ({problem})"
    packed = f"packed fits in {ratio:.2f}x the memory" if packed_fit["verdict"] == "fits" else (
        f"packed does not fit either ({packed_fit['reason']})")
    if separate_fit["verdict"] != "fits":
        return packed_fit["verdict"] == "fits", f"one base per worker does not fit ({separate_fit['reason']}); {packed}"
    if at_once < k:
        return packed_fit["verdict"] == "fits", f"only {at_once} of the {k} adapter workers run at once; {packed}"
    return False, (f"one base per worker fits, all {k} at once ({packed}, but one worker doing "
                   f"{k} adapters' compute is slower than {k} in parallel)")


def schedule(spec: dict, profile: Optional[str], strict: bool) -> tuple[int, list[str]]:
    """How many adapter workers the profile runs at once, each with its data stream's CPUs.

    A worker that fits nowhere would wait forever: refused (strict) or warned. More workers than
    the profile holds run in waves, each starting as an earlier one ends.
    """
    from cluster import profiles as cluster_profiles
    from launcher.planner import capacity, schedule_problem

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
