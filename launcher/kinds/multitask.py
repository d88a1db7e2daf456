"""`kind: multitask`: one base model, one LoRA adapter per task, one Ray worker per adapter (or
all adapters packed on one base in one worker), run by jobs/multitask.py (`mode: adapters`, the
default); or one shared backbone with a classification head per task, trained together in one Ray
Train run on a weighted mixture of the tasks' streams, run by jobs/joint.py (`mode: joint`).

Its spec model; each task's effective settings (`task_settings`, which the job reads too, so both
see the same merge); its data checks and steps; the planner's choice between one base per worker
and packed adapters; and how plan, the summary and the report show it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, Field, field_validator, model_validator

from common.units import size
from launcher.errors import PlanError
from launcher.kinds import Engine, Kind, check_datasets, layout, register_kind, resolve_data, resolve_model
from launcher.kinds.multitask_adapters import (
    ADAPTER_IGNORES,
    MULTITASK_IGNORES,
    check_fit,
    packing_problem,
    task_settings,
    workers,
)
from launcher.kinds.multitask_joint import (
    DATA_ROLES,
    JOINT_DATA,
    JOINT_STRATEGIES,
    check_joint_data,
    check_joint_fit,
    describe_joint,
    joint_problems,
    summary_joint,
)
from launcher.spec import (
    MAX_BATCH,
    MAX_CPUS,
    MAX_EPOCHS,
    MAX_GPUS,
    MAX_STEPS,
    DataSpec,
    JobBase,
    ModelSpec,
    Strict,
    TrainSpec,
)
from launcher.strategies.freeze import FreezeStrategy
from launcher.strategies.full import FullStrategy
from launcher.strategies.lora import LoraStrategy

MULTITASK_DATA = ("causal_lm", "instruction", "chat")  # tasks an adapter of a causal LM learns


class LoraOverride(Strict):
    r: Optional[int] = Field(None, gt=0, le=1024)
    alpha: Optional[float] = Field(None, gt=0)
    dropout: Optional[float] = Field(None, ge=0, lt=1)
    target_modules: Optional[Union[Literal["all-linear"], list[str]]] = None


class TrainOverride(Strict):
    max_steps: Optional[int] = Field(None, gt=0, le=MAX_STEPS)
    epochs: Optional[float] = Field(None, gt=0, le=MAX_EPOCHS)
    micro_batch: Optional[int] = Field(None, gt=0, le=MAX_BATCH)
    lr: Optional[float] = Field(None, gt=0, lt=1)
    seed: Optional[int] = None


class TaskSpec(Strict):
    name: str = Field(pattern=r"^[a-z0-9]([a-z0-9_-]{0,38}[a-z0-9])?$",
                      description="the adapter's (or head's) name: lower-case letters, digits, '-' and '_'")
    data: DataSpec
    lora: LoraOverride = Field(default_factory=LoraOverride, description="overrides of strategy:")
    train: TrainOverride = Field(default_factory=TrainOverride, description="overrides of train:")
    weight: Optional[float] = Field(None, gt=0, le=1e6, description="mode joint: the task's share of the "
                                    "mixed stream (weights are relative: 3 and 1 give 75% and 25% of the steps)")
    num_labels: Optional[int] = Field(None, gt=1, le=100000, description="mode joint: the classes of its head")

    @field_validator("data")
    @classmethod
    def _causal_task(cls, value: DataSpec) -> DataSpec:
        if value.task not in MULTITASK_DATA + JOINT_DATA:
            raise ValueError(f"data.task {value.task!r} cannot train a causal-LM adapter (nor, in mode: joint, "
                             f"a classification head); use one of {', '.join(MULTITASK_DATA + JOINT_DATA)}")
        if value.replay or value.retain:
            raise ValueError("data.replay and data.retain are not supported per task; remove them")
        return value


class AdapterResources(Strict):
    cpus_per_worker: float = Field(0.5, gt=0, le=MAX_CPUS, description="per adapter worker (or the packed one)")
    gpus_per_worker: float = Field(0, ge=0, le=MAX_GPUS, description="1 on a GPU cluster: one GPU per adapter")
    data_cpus_per_worker: float = Field(
        0.2, gt=0, le=MAX_CPUS, description="CPUs reserved beside each worker for its Ray Data stream (read, tokenize)")


class MultitaskSpec(JobBase):
    kind: Literal["multitask"]
    mode: Literal["adapters", "joint"] = Field(
        "adapters", description="adapters: one LoRA adapter per task (packing: puts them on one base); "
        "joint: one shared backbone and one classification head per task, trained together")
    model: ModelSpec = Field(default_factory=ModelSpec)
    strategy: Annotated[Union[LoraStrategy, FullStrategy, FreezeStrategy], Field(discriminator="type")] = Field(
        default_factory=lambda: LoraStrategy(type="lora"),
        description="mode adapters: the LoRA settings every task starts from; mode joint: how the "
        "shared backbone trains (full, freeze patterns: freeze: ['.'] trains the heads alone, or lora)")
    head_lr: Optional[float] = Field(None, gt=0, lt=1, description="mode joint: the heads' learning rate "
                                     "(default train.lr): new heads learn faster than a pretrained backbone")
    train: TrainSpec = Field(default_factory=TrainSpec, description="what every task starts from")
    tasks: list[TaskSpec] = Field(min_length=1)
    packing: Union[bool, Literal["auto"]] = Field(
        False, description="true: all adapters on one shared base in one worker (the packed engine: one "
        "equal micro_batch per task, lora dropout 0); auto: the planner packs where one base per worker "
        "does not fit or would run in waves, and says why")
    resources: AdapterResources = Field(default_factory=AdapterResources)

    @field_validator("tasks")
    @classmethod
    def _unique_names(cls, tasks: list[TaskSpec]) -> list[TaskSpec]:
        names = [t.name for t in tasks]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"task names must be unique; rename {', '.join(twice)}")
        return tasks

    @model_validator(mode="after")
    def _mode_fields(self) -> "MultitaskSpec":
        problems = joint_problems(self) if self.mode == "joint" else adapter_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _packable(self) -> "MultitaskSpec":
        if self.packing is True and self.mode == "adapters":
            problem = packing_problem(self.model_dump())
            if problem:
                raise ValueError(f"{problem}; or set packing: false")
        return self


def adapter_problems(spec: MultitaskSpec) -> list[str]:
    """What mode adapters does not run, one line each (the fields of mode joint)."""
    found = []
    if spec.strategy.type != "lora":
        found.append(f"strategy: {spec.strategy.type} trains a shared backbone in mode: joint only; "
                     "use type lora (one adapter per task) or set mode: joint")
    if spec.head_lr is not None:
        found.append("head_lr is read in mode: joint only; remove it or set mode: joint")
    if spec.train.precision == "fp16":
        found.append("train.precision: fp16 is not run by kind multitask (its adapters' steps have no loss "
                     "scaler); use bf16 or fp32")
    for t in spec.tasks:
        for field in ("weight", "num_labels"):
            if getattr(t, field) is not None:
                found.append(f"tasks.{t.name}.{field} is read in mode: joint only; remove it or set mode: joint")
        if t.data.task in JOINT_DATA:
            found.append(f"tasks.{t.name}: data.task {t.data.task} trains a head in mode: joint only; "
                         f"set mode: joint or use {', '.join(MULTITASK_DATA)}")
    return found




class TaskSettings(BaseModel):
    """One task's effective settings as typed spec parts: what an adapter worker trains by."""

    name: str
    data: DataSpec
    lora: LoraStrategy
    train: TrainSpec
    model: ModelSpec = ModelSpec()  # the shared base's: its tokenizer encodes the task's rows


def typed_task_settings(spec: "MultitaskSpec", task: "TaskSpec") -> TaskSettings:
    """`task_settings` on the typed spec: the spec's LoRA and train, overridden by the task's
    (the overrides were validated with the task)."""
    return TaskSettings(
        name=task.name, data=task.data, model=spec.model,
        lora=spec.strategy.model_copy(update=task.lora.model_dump(exclude_none=True)),
        train=spec.train.model_copy(update=task.train.model_dump(exclude_none=True)))


def missing_steps(spec: dict) -> list[str]:
    """Tasks whose step count is neither set nor countable without preflight."""
    return [t["name"] for t in spec["tasks"] if task_settings(spec, t)["train"].get("max_steps") is None]


def check_data(spec: dict, target: str = "local") -> tuple[dict, list[str]]:
    """Footer checks of every task's datasets; fills each task's `train.max_steps` when unset.

    Returns `{"<task>.<role>": {"rows", "files"}}` and warnings, each naming its task.
    """
    from launcher.datacheck import steps_for, sufficiency

    entries = [(f"tasks.{t['name']}.", role, t["data"].get(role), t["data"])
               for t in spec["tasks"] for role in DATA_ROLES]
    checked, warnings = check_datasets(entries, target)
    found = {f"{prefix[len('tasks.'):-1]}.{role}": info for (prefix, role), info in checked.items()}
    for task in spec["tasks"]:
        name, data = task["name"], task["data"]
        settings = task_settings(spec, task)
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
        lines.append(f"memory        one base per worker {size(mt['separate_total_bytes'], 2)} in all, "
                     f"packed {size(mt['packed_total_bytes'], 2)} ({mt['packed_vs_separate']:.2f}x)")
    return lines


class Multitask(Kind):
    name = "multitask"
    model = MultitaskSpec
    # jobs/multitask.py streams each task through the base's tokenizer (jobs/text.py) into a causal
    # LM, one step per micro-batch in train.precision (bf16 autocast on a 16-bit base on GPUs, as
    # the finetune engine): the torch engine's other step settings are refused.
    # mode joint: jobs/joint.py, one Ray Train worker, plain fp32 steps (the same settings refused).
    engines = {"multitask": Engine("multitask", "jobs.multitask", tasks=MULTITASK_DATA,
                                   sources=("tiny-llama", "hf:"), strategies=("lora",), ignores=ADAPTER_IGNORES),
               "joint": Engine("joint", "jobs.joint", tasks=JOINT_DATA, sources=("minilm", "hf:"),
                               strategies=JOINT_STRATEGIES, ignores=MULTITASK_IGNORES)}
    trains = "adapters (or, in mode: joint, heads)"

    def engine(self, spec) -> Engine:
        mode = spec.get("mode") if isinstance(spec, dict) else getattr(spec, "mode", None)
        return self.engines["joint" if mode == "joint" else "multitask"]

    def _other_engines(self, runs) -> str:
        names = [e.name for e in self.engines.values() if runs(e)]
        return f", or mode: {'joint' if names[0] == 'joint' else 'adapters'}" if names else ""

    def datasets(self, spec) -> list:
        return [(f"tasks.{t.name}.data", t.data) for t in spec.tasks]

    def own_refusals(self, spec) -> list[str]:
        found = []
        if spec.model.num_labels:
            found.append(f"model.num_labels: {spec.model.num_labels} is not run by kind multitask "
                         "(its adapters train a causal LM; a joint run's heads take tasks.<name>.num_labels); "
                         "remove it")
        return found

    def label(self, spec: dict) -> str:
        return f"{super().label(spec)}, joint" if spec.get("mode") == "joint" else super().label(spec)

    def resolve_paths(self, spec: dict, resolve) -> None:
        for task in spec["tasks"]:
            resolve_data(task["data"], resolve)
        resolve_model(spec["model"], resolve)

    def check_data(self, spec: dict, target: str) -> tuple[dict, list[str]]:
        return check_joint_data(spec, target) if spec.get("mode") == "joint" else check_data(spec, target)

    def estimate(self, spec: dict, profile: Optional[str], strict: bool):
        own = check_joint_fit if spec.get("mode") == "joint" else check_fit
        return own(spec, profile, strict)

    def without_preflight(self, spec: dict) -> list[str]:
        if spec.get("mode") == "joint":
            if spec["train"].get("max_steps") is None:
                raise PlanError("train.max_steps is not set and preflight is off: set it, or allow preflight")
            return []
        if missing_steps(spec):
            raise PlanError(f"train.max_steps is not set for tasks {', '.join(missing_steps(spec))} "
                            "and preflight is off: set it, or allow preflight")
        if spec["packing"] == "auto":
            spec["packing"] = False
            return ["packing: auto -> false (preflight is off: nothing to decide on)"]
        return []

    def resources(self, spec: dict, estimate: Optional[dict]) -> dict:
        if spec.get("mode") == "joint":
            return {**layout(1, spec["resources"]), "at_once": 1}
        k = workers(spec)
        # How many adapter workers run together (the rest wait their turn).
        at_once = min(k, ((estimate or {}).get("multitask") or {}).get("at_once", k))
        return {**layout(k, spec["resources"]), "at_once": at_once}

    def describe(self, spec: dict, estimate: Optional[dict]) -> list[str]:
        own = describe_joint if spec.get("mode") == "joint" else describe
        return own(spec, estimate) + super().describe(spec, estimate)

    def format_estimate(self, estimate: dict) -> str:
        from launcher.planner import format_estimate

        return format_estimate(estimate)

    def summary(self, manifest: dict, s: dict) -> str:
        """One line per adapter, and how to use them (a joint run: one line per head)."""
        if s.get("mode") == "joint":
            return summary_joint(manifest, s)
        from common.units import metric as _f
        from common.units import size as _size

        run = manifest.get("run_id")
        shape = "packed on one base" if s.get("packing") else "one worker per adapter"
        lines = [f"run            {run}", f"layout         {shape}"]
        for name, t in s.get("tasks", {}).items():
            ev = t.get("eval") or {}
            kept = " (kept from an earlier attempt)" if name in s.get("kept", []) else ""
            exact = (f", exact match {_f(ev.get('eval_exact_match_before'))} -> {_f(ev['eval_exact_match_after'])}"
                     if ev.get("eval_exact_match_after") is not None else "")
            lines.append(f"  task {name:<14} {t.get('steps')} steps, eval loss {_f(ev.get('eval_loss_before'))} -> "
                         f"{_f(ev.get('eval_loss'))}{exact}, {t.get('trainable_params') or 0:,} trainable, "
                         f"{_size(t.get('bytes'))}{kept}")
        lines += [f"adapters       {_size(s.get('export_bytes'))} in all; ftlaunch adapters list {run}",
                  f"wall time      {s.get('wall_time_s')} s",
                  f"artifacts      {manifest.get('plan', {}).get('run_dir', '?')} (registry.json, adapters/)"]
        return "\n".join(lines)

    def sections(self, run_dir: Path, manifest: dict) -> list:
        from common.units import metric as _f
        from common.units import size as _size
        from launcher.report import Section, loss_facts, read_jsonl

        recorded = manifest.get("tasks") or {}
        registry = (manifest.get("summary") or {}).get("tasks") or {}
        out = []
        for task in (manifest.get("spec") or {}).get("tasks", []):
            name = task["name"]
            t = recorded.get(name, {})
            ev = t.get("eval") or {}
            s = Section(f"task {name}", name, read_jsonl(run_dir / f"metrics-{name}.jsonl"),
                        t.get("status", "not finished"), t.get("error"))
            points = [(step, ev[k]) for step, k in ((0, "eval_loss_before"), (t.get("steps"), "eval_loss"))
                      if ev.get(k) is not None and step is not None]
            if points:
                s.evals["eval loss"] = points
            s.facts = loss_facts(s.metrics) + [
                f"eval loss {_f(ev.get('eval_loss_before'))} -> {_f(ev.get('eval_loss'))} (before training -> last)"]
            if ev.get("eval_accuracy") is not None:  # a joint run's head
                s.evals["eval accuracy"] = [(r["step"], r["eval_accuracy"]) for r in s.metrics if "eval_accuracy" in r]
                s.facts.append(f"eval accuracy {_f(ev.get('eval_accuracy_before'))} -> {_f(ev['eval_accuracy'])}")
            if name in registry:
                r = registry[name]
                s.facts.append(f"adapter {r.get('trainable_params') or 0:,} trainable parameters, "
                               f"{_size(r.get('bytes'))}")
            out.append(s)
        return out

    def spec_lines(self, spec: dict) -> list[str]:
        lines = []
        for t in spec.get("tasks") or []:
            own = ", ".join(f"{k} {v}" for k, v in _set_fields({k: v for k, v in t.items()
                                                                 if k not in ("name", "data")}))
            data = t.get("data") or {}
            lines.append(f"task {t['name']}: {data.get('task')} on {data.get('train')}" + (f"; {own}" if own else ""))
        return lines

    def planned_memory(self, manifest: dict, profile: Optional[str]) -> dict:
        est = self.recorded_estimate(manifest, profile)
        if not est:
            return {}
        if "joint" in est:
            return {n: est["memory"]["total"] for n in est["joint"]["heads"]}
        mt = est["multitask"]
        return {n: mt["packed_total_bytes"] if mt["packing"] else t["memory_total"] for n, t in mt["tasks"].items()}


def _set_fields(d: dict, prefix: str = ""):
    """(dotted key, value) of every field a task sets itself (the rest is inherited: None)."""
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _set_fields(v, f"{prefix}{k}.")
        elif v is not None:
            yield f"{prefix}{k}", v


register_kind(Multitask())
