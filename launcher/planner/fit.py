"""Does a job fit a cluster profile, and if not, what would: each alternative re-estimated and
spelled as the spec overrides (and `--profile`) that make it, so a user can paste it and re-plan.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass
from typing import Optional, Union

from cluster import profiles as cluster_profiles
from common.units import gib
from launcher.dsconfig import ENGINE_STRATEGIES
from launcher.errors import PlanError
from launcher.planner.counts import lora_counts
from launcher.planner.memory import GIB, remeasure

USABLE_FRACTION = 0.9  # of GPU (or node) memory; the rest goes to the CUDA context, allocator slack
LORA_FIELDS = {"type", "r", "alpha", "dropout", "target_modules"}  # what qlora has of lora's too
DEEPSPEED_SETTINGS = ("zero_stage", "offload_optimizer", "offload_params")


@dataclass(frozen=True)
class Levers:
    """The spec fields a suggestion may change. `engine`: the spec's engine (None: the job has no
    engine field, as a pipeline stage); `strategy`: its strategy block (None: fixed); the others
    say whether `train.micro_batch` and `resources.*` are fields of the spec."""

    engine: Optional[str] = "torch"
    strategy: Optional[dict] = None
    micro_batch: bool = True
    resources: bool = True


# A pipeline stage's settings live in a list (`stages:`), which dotted overrides cannot address:
# only another profile is suggested for it.
STAGE_LEVERS = Levers(engine=None, strategy=None, micro_batch=False, resources=False)


def _resources(resources: dict) -> tuple[int, float, float]:
    return (
        int(resources.get("workers", 1)),
        float(resources.get("cpus_per_worker", 1)),
        float(resources.get("gpus_per_worker", 0)),
    )


def schedule_problem(profile: dict, resources: dict) -> Optional[str]:
    """Why Ray could never place this job on the profile (it would sit PENDING forever), or None."""
    workers, cpw, gpw = _resources(resources)
    node_gpus, node_cpus, nodes = profile["gpus"], profile["cpus"], profile["nodes"]
    if gpw > 0 and not node_gpus:
        return f"each worker asks {gpw:g} GPU but {profile['name']} has no GPU"
    if gpw > node_gpus:
        return f"each worker asks {gpw:g} GPUs but a node of {profile['name']} has {node_gpus}"
    if cpw > node_cpus:
        return f"each worker asks {cpw:g} CPUs but a node of {profile['name']} has {node_cpus}"
    eps = 1e-9
    per_node = math.floor(node_cpus / cpw + eps)
    if gpw:
        per_node = min(per_node, math.floor(node_gpus / gpw + eps))
    if workers > per_node * nodes:
        return (
            f"{workers} workers x ({cpw:g} CPU, {gpw:g} GPU) exceed {profile['name']}, "
            f"which holds {per_node * nodes} such workers"
        )
    return None


def capacity(profile: dict, resources: dict) -> int:
    _, cpw, gpw = _resources(resources)
    per_node = math.floor(profile["cpus"] / cpw + 1e-9)
    if gpw:
        per_node = min(per_node, math.floor(profile["gpus"] / gpw + 1e-9))
    return per_node * profile["nodes"]


def _memory_problem(memory: dict, profile: dict, resources: dict) -> tuple[Optional[str], dict]:
    workers, _, gpw = _resources(resources)
    per_node = max(1, min(workers, capacity(profile, resources) // max(1, profile["nodes"]) or 1))
    node_ram = USABLE_FRACTION * profile["memory_gib"] * GIB
    if gpw > 0:
        budget = USABLE_FRACTION * profile["gpu_memory_gib"] * GIB * min(gpw, 1.0)
        need_cpu = memory["cpu_offload"] * per_node
        info = {"per_gpu": memory["total"], "usable_per_gpu": int(budget), "cpu_per_node": int(need_cpu),
                "usable_cpu_per_node": int(node_ram)}
        if memory["total"] > budget:
            usable = f"{USABLE_FRACTION:.0%} of {profile['gpu_memory_gib']:g} GiB"
            return (f"needs {gib(memory['total'])} per GPU, {profile['name']} offers "
                    f"{gib(budget)} usable ({usable})"), info
        if need_cpu > node_ram:
            return (f"offload needs {gib(need_cpu)} of CPU memory per node, {profile['name']} has "
                    f"{gib(node_ram)} usable"), info
        return None, info
    need = (memory["total"] + memory["cpu_offload"]) * per_node
    info = {"per_worker": memory["total"], "cpu_per_node": int(need), "usable_cpu_per_node": int(node_ram)}
    if need > node_ram:
        return (f"needs {gib(need)} of CPU memory for {per_node} worker(s) per node, "
                f"{profile['name']} has {gib(node_ram)} usable"), info
    return None, info


def _verdict(memory: dict, profile: dict, resources: dict) -> tuple[str, Optional[str], dict]:
    problem = schedule_problem(profile, resources)
    if problem:
        return "cannot-schedule", problem, {}
    problem, info = _memory_problem(memory, profile, resources)
    return ("does-not-fit", problem, info) if problem else ("fits", None, info)


def fit(memory: dict, profile: Union[str, dict], resources: dict, levers: Optional[Levers] = None) -> dict:
    """Does the job fit the profile? If not, which changes (each re-estimated) would make it fit."""
    profile = cluster_profiles.get_profile(profile) if isinstance(profile, str) else profile
    verdict, reason, info = _verdict(memory, profile, resources)
    result = {
        "profile": profile["name"],
        "verdict": verdict,
        "reason": reason,
        "memory": info,
        "assumptions": [
            f"usable memory is {USABLE_FRACTION:.0%} of the GPU's (CUDA context, allocator slack)"],
        "suggestions": [],
    }
    if verdict != "fits":
        result["suggestions"] = suggestions(memory, profile, resources, levers)
    return result


def _value(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)


def spec_overrides(settings: dict, levers: Levers) -> Optional[list[str]]:
    """The `key=value` overrides that make these planner settings, or None when no field of the
    spec can (a pipeline stage's checkpointing or micro-batch)."""
    out, engine = [], levers.engine
    new_type = settings.get("strategy_type")
    if new_type is not None:
        if levers.strategy is None:
            return None
        current, r = levers.strategy, settings["r"]
        if set(current) <= LORA_FIELDS:  # full or lora: every field it has, the new strategy has
            out.append(f"strategy.type={new_type}")
            if current.get("r") != r:
                out.append(f"strategy.r={r}")
        else:
            out.append(f"strategy={{type: {new_type}, r: {r}}}")
        if engine == "deepspeed" and new_type not in ENGINE_STRATEGIES:
            out += ["engine=torch", "deepspeed=null"]  # the settings hold the torch engine's defaults
            engine = "torch"
            settings = {k: v for k, v in settings.items() if k not in DEEPSPEED_SETTINGS}
    if any(k in settings for k in DEEPSPEED_SETTINGS):
        if engine is None:
            return None
        if engine != "deepspeed":
            if (new_type or levers.strategy and levers.strategy.get("type")) not in ENGINE_STRATEGIES:
                return None
            out.append("engine=deepspeed")
            engine = "deepspeed"
        out += [f"deepspeed.{k}={_value(settings[k])}" for k in DEEPSPEED_SETTINGS if k in settings]
    if settings.get("grad_checkpointing"):  # train.grad_checkpointing, on either engine
        if engine is None:
            return None
        out.append("train.grad_checkpointing=true")
    if "micro_batch" in settings:
        if not levers.micro_batch:
            return None
        out.append(f"train.micro_batch={settings['micro_batch']}")
    for key in ("gpus_per_worker", "cpus_per_worker", "workers"):
        if key in settings:
            if not levers.resources:
                return None
            out.append(f"resources.{key}={_value(settings[key])}")
    return out


def suggestions(memory: dict, profile: dict, resources: dict, levers: Optional[Levers] = None) -> list[dict]:
    """Alternatives that would fit, each re-estimated; only the fitting ones a spec field (or
    `--profile`) can make are listed, each with the overrides that make it."""
    inputs = memory["inputs"]
    counts, kind = inputs["counts"], inputs["strategy_type"]
    levers = levers or Levers(strategy={"type": kind})
    workers, cpw, gpw = _resources(resources)
    on_gpu = gpw > 0
    r = int(counts.get("lora_r") or 16)
    candidates = []  # (change, settings, memory, profile, resources)

    def add(change, settings, mem=None, prof=None, res=None, counts_=None):
        try:
            mem = mem or remeasure(memory, counts_, **{k: v for k, v in settings.items() if k in inputs})
        except PlanError:
            return
        candidates.append((change, settings, mem, prof or profile, res or resources))

    def new_strategy(strategy_type: str, rank: int) -> dict:
        settings = {"strategy_type": strategy_type, "r": rank}
        torch_engine = levers.engine != "deepspeed" or strategy_type not in ENGINE_STRATEGIES
        if levers.engine == "deepspeed" and strategy_type not in ENGINE_STRATEGIES:
            # Runs on the torch engine instead, with its defaults (precision and checkpointing are train.*).
            settings.update(zero_stage=0, offload_optimizer=False, offload_params=False, autocast=True)
        if torch_engine:  # the torch engine loads an adapter's frozen base in 16 bits on GPUs
            settings["base_16bit"] = on_gpu and inputs["precision"] != "fp32"
        return settings

    def lora_like(strategy_type: str, rank: int) -> dict:
        # The counts of a LoRA on all linear layers, with what its activations depend on.
        return {**lora_counts(counts, rank, strategy_type), "lora_r": rank, "lora_targets": "all-linear",
                "lora_dropout": 0.0}

    problem = schedule_problem(profile, resources)
    if problem:
        capacity_res = dict(resources)
        if gpw > profile["gpus"] and profile["gpus"]:
            capacity_res["gpus_per_worker"] = 1
            add("gpus_per_worker=1 (one GPU per worker; Ray Train runs one rank per GPU)",
                {"gpus_per_worker": 1}, mem=memory, res=capacity_res)
        if cpw > profile["cpus"]:
            capacity_res = {**capacity_res, "cpus_per_worker": profile["cpus"]}
            add(f"cpus_per_worker={profile['cpus']}", {"cpus_per_worker": profile["cpus"]},
                mem=memory, res=capacity_res)
        fits_cpus = capacity_res.get("cpus_per_worker", cpw) <= profile["cpus"]
        cap = capacity(profile, capacity_res) if fits_cpus else 0
        if 0 < cap < workers:
            res = {**capacity_res, "workers": cap}
            mem = remeasure(memory, workers=cap)
            also = {k: v for k, v in capacity_res.items() if k != "workers" and v != resources.get(k)}
            label = "".join(f"{k}={v:g}, " for k, v in also.items())  # the capacity changes made above
            add(f"{label}workers={cap} (what {profile['name']} can hold)", {**also, "workers": cap},
                mem=mem, res=res)
    else:
        full_like = kind in ("full", "freeze")
        ds = {"autocast": False, "base_16bit": False}  # DeepSpeed keeps 16-bit states, fp32 master
        if full_like and workers > 1 and inputs["zero_stage"] != 3:
            add(f"DeepSpeed ZeRO-3 over the {workers} workers", {"zero_stage": 3, **ds})
        if full_like and on_gpu:
            add("DeepSpeed ZeRO-2 with optimizer offload to CPU",
                {"zero_stage": 2, "offload_optimizer": True, **ds})
            add("DeepSpeed ZeRO-3 with optimizer and parameter offload to CPU",
                {"zero_stage": 3, "offload_optimizer": True, "offload_params": True, **ds})
        if kind in ("full", "freeze"):
            add(f"LoRA r={r} on all linear layers", new_strategy("lora", r), counts_=lora_like("lora", r))
        if kind in ("full", "freeze", "lora") and on_gpu:
            rr = int(r if kind != "lora" else counts.get("lora_r") or r)
            qc = lora_like("qlora", rr) if kind != "lora" else {**counts, "method": "qlora"}
            add(f"QLoRA r={rr} (4-bit NF4 base, double quantization)", new_strategy("qlora", rr), counts_=qc)
        if not inputs["grad_checkpointing"]:
            add("gradient checkpointing", {"grad_checkpointing": True})
        if inputs["micro_batch"] > 1:
            add("micro_batch=1", {"micro_batch": 1})
        cap = capacity(profile, resources)
        if full_like and cap > workers:
            for more in range(workers + 1, cap + 1):
                mem = remeasure(memory, workers=more, zero_stage=3, autocast=False, base_16bit=False)
                if _verdict(mem, profile, {**resources, "workers": more})[0] == "fits":
                    add(f"workers={more} with ZeRO-3", {"workers": more, "zero_stage": 3, **ds}, mem=mem,
                        res={**resources, "workers": more})
                    break
    if on_gpu:
        for other in cluster_profiles.gpu_profiles():
            if other["name"] == profile["name"] or other["gpu_memory_gib"] < profile["gpu_memory_gib"]:
                continue
            if _verdict(memory, other, resources)[0] == "fits":
                add(f"profile {other['name']} ({other['gpu_memory_gib']:g} GiB GPUs)",
                    {"profile": other["name"]}, mem=memory, prof=other)
                break
    # A change that alone does not fit is retried with smaller activations (checkpointing where a
    # spec field turns it on, micro_batch 1): activations often dominate, and "QLoRA" alone would
    # otherwise be hidden.
    extras = [("", {})]
    if not inputs["grad_checkpointing"]:
        extras.append((" + gradient checkpointing", {"grad_checkpointing": True}))
        if inputs["micro_batch"] > 1:
            extras.append((" + gradient checkpointing + micro_batch=1",
                           {"grad_checkpointing": True, "micro_batch": 1}))
    if inputs["micro_batch"] > 1:
        extras.append((" + micro_batch=1", {"micro_batch": 1}))
    out, seen = [], set()
    for change, settings, mem, prof, res in candidates:
        for suffix, extra in extras:
            if any(settings.get(k) == v for k, v in extra.items()):
                continue
            wanted = {k: v for k, v in {**settings, **extra}.items() if k != "profile"}
            overrides = spec_overrides(wanted, levers)
            if overrides is None:
                continue
            trial = remeasure(mem, None, **extra) if extra else mem
            if _verdict(trial, prof, res)[0] == "fits":
                flag = [] if prof["name"] == profile["name"] else ["--profile", prof["name"]]
                args = " ".join(shlex.quote(a) for a in overrides + flag)
                if args not in seen:  # "micro_batch=1 + checkpointing" is "checkpointing + micro_batch=1"
                    seen.add(args)
                    out.append({"change": change + suffix, "settings": {**settings, **extra},
                                "overrides": overrides, "args": args, "per_gpu_bytes": trial["total"],
                                "per_gpu_gib": round(trial["total"] / GIB, 2), "profile": prof["name"]})
                break
    return out
