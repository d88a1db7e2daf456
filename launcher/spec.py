"""The job spec: pydantic models discriminated on `kind:`, YAML loading, dotted overrides.

Every problem in a spec is reported at once, each with its field path, the bad value and, for a
misspelled key, the closest valid key.
"""

from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from launcher.errors import ConfigError
from launcher.fields import (  # noqa: F401  (re-exported: the spec's building blocks)
    MAX_BATCH, MAX_CPUS, MAX_EPOCHS, MAX_GPUS, MAX_STEPS, NAME_PATTERN, EnvName, EnvValue, PathStr,
    Patterns, Strict,
)
from launcher.strategies import STRATEGIES as STRATEGY_REGISTRY, spec_union
from launcher.strategies.lora import LoraStrategy

TASKS = ("causal_lm", "instruction", "classification", "ner", "vqa")


# ---------------------------------------------------------------------------------------------
# Model and strategy (each strategy's spec model lives in its file under launcher/strategies/)


MODEL_SOURCES = ("tiny-llama", "minilm", "arrcoc-mini", "arrcoc-7b", "llama-2-7b")


class ModelSpec(Strict):
    source: str = Field("tiny-llama", description="tiny-llama | minilm | hf:<local path>")
    config: dict[str, Any] = Field(default_factory=dict, description="overrides of the model config")
    seq_len: int = Field(64, gt=0, le=32768)
    # transformers writes a label name per class into the config: a bound keeps that small.
    num_labels: Optional[int] = Field(None, gt=1, le=100_000, description="classification heads only")

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        known = f"{', '.join(MODEL_SOURCES)}, or hf:<local model folder>"
        if value in MODEL_SOURCES:
            return value
        if value.startswith("hf:"):
            if not value[3:].strip() or any(ord(c) < 32 for c in value):
                raise ValueError("hf: needs the path of a local model folder (with config.json)")
            return value
        hint = difflib.get_close_matches(value, MODEL_SOURCES, n=1)
        fix = f"did you mean '{hint[0]}'? Known: {known}" if hint else f"use one of {known}"
        raise ValueError(f"unknown model source; {fix}")


STRATEGIES = {name: s.spec for name, s in STRATEGY_REGISTRY.items()}  # type tag -> spec model


# ---------------------------------------------------------------------------------------------
# Data, training, resources


class ReplaySpec(Strict):
    path: PathStr
    fraction: float = Field(0.2, gt=0, lt=1)


class DataSpec(Strict):
    task: Literal[TASKS] = "causal_lm"
    train: PathStr
    eval: Optional[PathStr] = None
    retain: Optional[PathStr] = None
    replay: Optional[ReplaySpec] = None
    columns: dict[str, str] = Field(default_factory=dict, description="task role -> column name")
    force: bool = Field(False, description="run even when the dataset is far too small")


# Ray Train's FailureConfig.max_failures for every kind that trains through Ray Train.
MaxFailures = Annotated[int, Field(
    ge=-1, le=1000, description="worker failures recovered from the last checkpoint (-1: no limit); "
    "an error in the training code itself also uses one")]


class TrainSpec(Strict):
    max_steps: Optional[int] = Field(None, gt=0, le=MAX_STEPS, description="default: from epochs and row counts")
    epochs: float = Field(1.0, gt=0, le=MAX_EPOCHS, description="used when max_steps is not set")
    micro_batch: int = Field(8, gt=0, le=MAX_BATCH)
    lr: float = Field(2e-4, gt=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0, le=MAX_STEPS)
    grad_clip: Optional[float] = Field(1.0, gt=0)
    report_every: int = Field(20, gt=0, le=MAX_STEPS, description="steps between reports and checkpoints")
    eval_batches: int = Field(4, ge=0, le=MAX_STEPS, description="batches of the eval split at each report")
    seed: int = 0
    max_failures: MaxFailures = 1


class ResourcesSpec(Strict):
    workers: int = Field(2, gt=0, le=4096)
    cpus_per_worker: float = Field(0.5, gt=0, le=MAX_CPUS)
    gpus_per_worker: float = Field(0, ge=0, le=MAX_GPUS)


class DeepSpeedSpec(Strict):
    """The `deepspeed:` block of `engine: deepspeed` (field names shared with launcher/planner/)."""

    zero_stage: Literal[0, 1, 2, 3] = 0
    offload_optimizer: bool = Field(False, description="optimizer states in CPU memory (ZeRO 1-3)")
    offload_params: bool = Field(False, description="parameters in CPU memory (ZeRO-3 only)")
    precision: Optional[Literal["bf16", "fp32", "fp16"]] = Field(
        None, description="default: bf16 on GPUs, fp32 on CPU (fp16 is refused on CPU)"
    )
    grad_accumulation: int = Field(1, gt=0, le=MAX_BATCH, description="micro-batches per optimizer step")
    activation_checkpointing: bool = False


# Environment names that hold credentials: their values must be references, never literals.
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|ACCESS_?KEY|CREDENTIAL", re.I)


class JobBase(Strict):
    name: str = Field(pattern=NAME_PATTERN, description="lower-case letters, digits and '-'")
    storage: PathStr = "./runs"
    env: dict[EnvName, EnvValue] = Field(
        default_factory=dict, description="environment for the job; secrets only as references: "
        "env:NAME (read from the cluster's environment) or secret:SECRET/KEY (Kubernetes)")
    pending_timeout: Optional[float] = Field(
        900, gt=0, description="seconds the job may wait for resources before it is stopped (null: no limit)")

    @field_validator("env")
    @classmethod
    def _no_literal_secrets(cls, env: dict[str, str]) -> dict[str, str]:
        for key, value in env.items():
            if value.startswith("env:") and not re.fullmatch(r"env:[A-Za-z_][A-Za-z0-9_]*", value):
                raise ValueError(f"env.{key}: {value!r} is not env:NAME")
            if SECRET_NAME.search(key) and not value.startswith(("env:", "secret:")):
                raise ValueError(
                    f"env.{key} holds a literal secret, which would be written to the job's metadata and "
                    f"manifest; use env.{key}: env:{key} (read from the cluster's environment) or "
                    "secret:NAME/KEY (a Kubernetes Secret)")
        return env


class LrGroup(Strict):
    """Parameters whose names match `params` (regex search; first matching group wins) get `lr`."""

    name: str
    params: Patterns
    lr: float = Field(gt=0, lt=1)


class EwcSpec(Strict):
    """Elastic weight consolidation: lambda/2 * sum F_i (theta_i - theta*_i)^2, F from the retain set."""

    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False,
                              populate_by_name=True, serialize_by_alias=True)
    lam: float = Field(100.0, gt=0, alias="lambda", description="penalty weight")
    samples: int = Field(64, gt=0, le=100000, description="retain examples for the Fisher diagonal")


class MitigationSpec(Strict):
    """Catastrophic-forgetting mitigation beyond replay (which is `data.replay`)."""

    ewc: Optional[EwcSpec] = None
    lr_cap: Optional[float] = Field(None, gt=0, lt=1, description="no parameter group trains above it")


class FinetuneSpec(JobBase):
    kind: Literal["finetune"]
    model: ModelSpec = Field(default_factory=ModelSpec)
    strategy: spec_union()
    engine: Literal["torch", "deepspeed"] = "torch"
    deepspeed: Optional[DeepSpeedSpec] = None
    data: DataSpec
    train: TrainSpec = Field(default_factory=TrainSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    lr_groups: Optional[Union[Literal["default"], list[LrGroup]]] = Field(
        None, description="per-group learning rates; 'default': new 1e-3, pretrained 2e-5, early 1e-5"
    )
    mitigation: MitigationSpec = Field(default_factory=MitigationSpec)

    @model_validator(mode="after")
    def _consistent(self):
        problems = []
        if self.data.task == "classification" and not self.model.num_labels:
            problems.append("data.task classification needs model.num_labels (e.g. 4)")
        if self.mitigation.ewc and not self.data.retain:
            problems.append("mitigation.ewc needs data.retain: the Fisher information comes from it")
        if problems:
            raise ValueError("; ".join(problems))
        return self


KINDS: dict[str, type[Strict]] = {}
JOB_MODULES: dict[str, str] = {}  # kind -> the cluster-side module that runs it (by name only)


def register_kind(name: str, model: type[Strict], job_module: str) -> None:
    """One registration per job kind: its spec model and its job module. Duplicates fail."""
    if name in KINDS:
        raise RuntimeError(f"job kind {name!r} is registered twice")
    KINDS[name] = model
    JOB_MODULES[name] = job_module


register_kind("finetune", FinetuneSpec, "jobs.finetune")


class CompareSpec(FinetuneSpec):
    """`kind: compare`: a base finetune (every field of one) and variants that override it.

    Every variant runs on the same data, steps and evaluation; a variant's `strategy` replaces the
    base's, every other key merges into it (e.g. `{engine: deepspeed, deepspeed: {zero_stage: 2}}`).
    """

    kind: Literal["compare"]
    variants: dict[str, dict[str, Any]] = Field(min_length=1, description="name -> overrides of the base")

    @field_validator("variants")
    @classmethod
    def _variant_names(cls, value: dict) -> dict:
        bad = [n for n in value if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,30}", n)]
        if bad:
            raise ValueError(f"variant name {bad[0]!r}: use lower-case letters, digits, '-' and '_'")
        return value

    @model_validator(mode="after")
    def _variants_run(self) -> "CompareSpec":
        self.variant_specs()  # every variant must be a valid finetune: all problems at once
        return self

    def variant_specs(self) -> dict[str, dict]:
        return expand_variants(self.model_dump(mode="json"))


def expand_variants(spec: dict) -> dict[str, dict]:
    """Each variant of a compare spec dict as a validated finetune spec dict (ConfigError if not)."""
    from launcher.dsconfig import problems

    base = {k: v for k, v in spec.items() if k not in ("kind", "variants")}
    out, errors = {}, []
    for name, overrides in spec["variants"].items():
        merged = _merge(_deep_copy(base), {k: v for k, v in overrides.items() if k != "strategy"})
        if "strategy" in overrides:
            merged["strategy"] = _deep_copy(overrides["strategy"])
        merged.update(kind="finetune", name=f"{spec['name']}-{name}".replace("_", "-")[:40].strip("-"))
        try:
            variant = _ADAPTER.validate_python(merged).model_dump(mode="json")
        except ValidationError as exc:
            errors += [f"variants.{name}: {_describe(e)}" for e in exc.errors()]
            continue
        errors += [f"variants.{name}: {p}" for p in problems(variant)]
        out[name] = variant
    if errors:
        raise ConfigError(errors)
    return out


def _merge(into: dict, overrides: dict) -> dict:
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = _deep_copy(value)
    return into


register_kind("compare", CompareSpec, "jobs.compare")


# ---------------------------------------------------------------------------------------------
# Loading


def load_spec(source: Union[str, Path, dict], overrides: tuple[str, ...] = ()) -> BaseModel:
    """Read a spec from a YAML file (or a dict), apply `a.b=value` overrides, validate it."""
    label = str(source) if not isinstance(source, dict) else None
    data = read_yaml(source) if not isinstance(source, dict) else _deep_copy(source)
    for item in overrides:
        apply_override(data, item, label)
    return validate(data, label)


def read_yaml(path: Union[str, Path]) -> dict:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"spec file not found: {path}; check the path") from None
    except OSError as exc:
        raise ConfigError(f"cannot read spec file {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: byte {exc.object[exc.start]:#04x} at offset {exc.start} is not UTF-8 text; "
            "save the spec as UTF-8 YAML"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: YAML error{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a spec is a YAML mapping with a 'kind:' key, got {type(data).__name__}")
    _check_tree(data, str(path))
    return data


MAX_VALUES = 100_000  # a real spec holds a few hundred; more is an alias bomb


def _check_tree(data: dict, source: str) -> None:
    """YAML aliases can make a mapping contain itself, or a few lines expand to millions of
    values: refuse both here, with where, before anything walks the spec."""
    count, stack = 0, [(data, (), frozenset())]
    while stack:
        node, where, above = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise ConfigError(f"the spec expands to over {MAX_VALUES:,} values (YAML aliases?); "
                              "write the values out or remove the aliases", source)
        if isinstance(node, (dict, list)):
            if id(node) in above:
                raise ConfigError(f"{'.'.join(where)}: a YAML alias makes this value contain itself; "
                                  "remove the alias", source)
            items = node.items() if isinstance(node, dict) else enumerate(node)
            stack += [(value, (*where, _key(key)), above | {id(node)}) for key, value in items]


def apply_override(data: dict, item: str, source: Optional[str] = None) -> None:
    """Set a dotted key from `a.b.c=value`; the value is parsed as YAML (`8`, `true`, `[q, v]`)."""
    key, sep, raw = item.partition("=")
    if not sep or not key or not re.fullmatch(r"[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*", key):
        raise ConfigError(f"override {item!r} is not key=value (e.g. train.max_steps=50)", source)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: '{part}' is not a mapping in the spec", source)
        node = child
    node[parts[-1]] = value


def validate(data: dict, source: Optional[str] = None) -> BaseModel:
    kind = data.get("kind")
    if not isinstance(kind, str) or kind not in KINDS:
        hint = difflib.get_close_matches(str(kind), KINDS, n=1)
        fix = f"did you mean '{hint[0]}'?" if hint else f"use one of: {', '.join(KINDS)}"
        got = "missing" if kind is None else repr(kind)
        raise ConfigError(f"kind: {got} is not a job kind; {fix}", source)
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as exc:
        raise ConfigError([_describe(err) for err in exc.errors()], source) from None


def _describe(err: dict) -> str:
    loc = _field_path(err["loc"])
    path = ".".join(_key(p) for p in loc) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        parent_fields = _fields_at(err["loc"][:-1])
        hint = difflib.get_close_matches(str(loc[-1]), parent_fields, n=1, cutoff=0.6)
        fix = f"did you mean '{'.'.join(map(str, loc[:-1] + [hint[0]]))}'?" if hint else (
            f"valid keys here: {', '.join(sorted(parent_fields))}" if parent_fields else "remove it"
        )
        return f"{path}: unknown key; {fix}"
    if kind == "missing":
        return f"{path}: required field is missing"
    if loc and loc[-1] == "[key]":  # a dict key failed its own type (env names)
        path = ".".join(_key(p) for p in loc[:-1])
        return f"{path}: invalid key: {err['msg']} (got {_short(err.get('input'))})"
    msg = err["msg"].removeprefix("Value error, ")
    if kind == "union_tag_invalid":
        tag, choices = err["ctx"]["tag"], STRATEGIES if path == "strategy" else KINDS
        hint = difflib.get_close_matches(str(tag), choices, n=1)
        fix = f"did you mean '{hint[0]}'?" if hint else f"use one of: {', '.join(choices)}"
        return f"{path}.{err['ctx']['discriminator'].strip(chr(39))}: {tag!r} is unknown; {fix}"
    if isinstance(err.get("input"), dict):  # a rule across fields: the message names them
        return f"{path}: {msg}"
    return f"{path}: {msg} (got {_short(err.get('input'))})"


def _key(part: Any) -> str:
    """A path part as typed in a spec; a key with spaces, control characters or the like quoted."""
    text = str(part)
    return text if re.fullmatch(r"[\w\-]+", text, re.ASCII) else repr(text)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _field_path(loc: tuple) -> list:
    """Drop the discriminator tags pydantic puts into locations of tagged-union members."""
    path = []
    for i, part in enumerate(loc):
        if i == 0 and part in KINDS or i > 0 and loc[i - 1] == "strategy" and part in STRATEGIES:
            continue
        path.append(part)
    return path


def _fields_at(loc: tuple) -> list[str]:
    """Valid keys of the model at a pydantic error location, for did-you-mean hints."""
    if not loc or loc[0] not in KINDS:
        return []
    model: Any = KINDS[loc[0]]
    for part in loc[1:]:
        if isinstance(model, type) and issubclass(model, BaseModel) and part in model.model_fields:
            model = _model_of(model.model_fields[part].annotation)
        elif part in STRATEGIES:
            model = STRATEGIES[part]
        elif isinstance(part, int):  # an item of a list of models (multitask tasks)
            continue
        else:
            return []
    if isinstance(model, type) and issubclass(model, BaseModel):
        return [f.alias or n for n, f in model.model_fields.items()]
    return []


def _model_of(annotation: Any) -> Any:
    for arg in (annotation, *typing.get_args(annotation)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return annotation


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


# ---------------------------------------------------------------------------------------------
# kind: multitask -- one base model, one LoRA adapter per task (jobs/multitask.py)

MULTITASK_DATA = ("causal_lm", "instruction")  # tasks an adapter of a causal LM learns


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
                      description="the adapter's name: lower-case letters, digits, '-' and '_'")
    data: DataSpec
    lora: LoraOverride = Field(default_factory=LoraOverride, description="overrides of strategy:")
    train: TrainOverride = Field(default_factory=TrainOverride, description="overrides of train:")

    @field_validator("data")
    @classmethod
    def _causal_task(cls, value: DataSpec) -> DataSpec:
        if value.task not in MULTITASK_DATA:
            raise ValueError(f"data.task {value.task!r} cannot train a causal-LM adapter; "
                             f"use one of {', '.join(MULTITASK_DATA)}")
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
    model: ModelSpec = Field(default_factory=ModelSpec)
    strategy: LoraStrategy = Field(default_factory=lambda: LoraStrategy(type="lora"),
                                   description="the LoRA settings every task starts from")
    train: TrainSpec = Field(default_factory=TrainSpec, description="what every task starts from")
    tasks: list[TaskSpec] = Field(min_length=1)
    packing: Union[bool, Literal["auto"]] = Field(
        False, description="true: all adapters on one shared base in one worker; auto: the planner "
        "packs when one base per worker does not fit")
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
    def _packed_without_dropout(self) -> "MultitaskSpec":
        if self.packing is True:
            for task in self.tasks:
                dropout = task.lora.dropout if task.lora.dropout is not None else self.strategy.dropout
                if dropout:
                    raise ValueError(
                        f"tasks.{task.name}: packed training needs lora dropout 0 (got {dropout}); "
                        "set strategy.dropout: 0 or packing: false")
        return self


register_kind("multitask", MultitaskSpec, "jobs.multitask")
# kind: pipeline (ARR-COC: stages that hand their checkpoints on; see jobs/pipeline.py)

# The parameter groups of an ARR-COC model: the vision encoder, the texture adapter (scorers,
# balancer, texture projection), the LLM's own weights, and the LoRA adapters on the LLM.
PARAM_GROUPS = ("vision", "texture", "llm", "lora")
ARRCOC_SOURCES = ("arrcoc-mini", "arrcoc-7b")


def _one_stage_resources() -> "ResourcesSpec":
    return ResourcesSpec(workers=1, cpus_per_worker=1)


class StageSpec(Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,30}$", description="lower-case, '-', '_'")
    train: list[Literal[PARAM_GROUPS]] = Field(min_length=1, description="groups that train")
    freeze: Optional[list[Literal[PARAM_GROUPS]]] = Field(
        None, description="groups that stay frozen; default: every group not in train"
    )
    strategy: Optional[LoraStrategy] = Field(None, description="adds LoRA to the LLM from this stage on")
    lr_groups: dict[str, float] = Field(description="learning rate per trained group")
    steps: int = Field(gt=0, le=MAX_STEPS)
    micro_batch: int = Field(16, gt=0, le=MAX_BATCH)
    report_every: int = Field(10, gt=0, le=MAX_STEPS, description="steps between reports and checkpoints")
    data: Optional[DataSpec] = Field(None, description="default: the pipeline's data")
    resources: ResourcesSpec = Field(default_factory=_one_stage_resources)

    @field_validator("train", "freeze")
    @classmethod
    def _no_repeats(cls, value):
        if value is not None and len(set(value)) != len(value):
            raise ValueError("a group is listed twice")
        return value

    @model_validator(mode="after")
    def _groups_agree(self):
        trained = set(self.train)
        if self.freeze is not None:
            both = trained & set(self.freeze)
            if both:
                raise ValueError(f"groups {sorted(both)} are both trained and frozen; list each once")
            missing = set(PARAM_GROUPS) - trained - set(self.freeze)
            if missing:
                raise ValueError(f"groups {sorted(missing)} are neither trained nor frozen; add them to freeze")
        bad = {k: v for k, v in self.lr_groups.items() if k not in trained or not 0 < v < 1}
        if bad:
            raise ValueError(f"lr_groups {bad}: each key must be a trained group with 0 < lr < 1")
        if set(self.lr_groups) != trained:
            raise ValueError(f"lr_groups needs a learning rate for each trained group: {sorted(trained)}")
        return self


class PipelineTrainSpec(Strict):
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: Optional[float] = Field(1.0, gt=0)
    eval_rows: int = Field(128, ge=0, le=MAX_STEPS, description="rows of the eval split scored after each stage")
    seed: int = 0
    max_failures: MaxFailures = 1


class PipelineSpec(JobBase):
    kind: Literal["pipeline"]
    model: ModelSpec = Field(default_factory=lambda: ModelSpec(source="arrcoc-mini", seq_len=32))
    data: Optional[DataSpec] = Field(None, description="the stages' data unless a stage has its own")
    train: PipelineTrainSpec = Field(default_factory=PipelineTrainSpec)
    stages: list[StageSpec] = Field(min_length=1)

    @field_validator("model")
    @classmethod
    def _arrcoc_model(cls, value: ModelSpec) -> ModelSpec:
        if value.source not in ARRCOC_SOURCES:
            raise ValueError(f"a pipeline runs an ARR-COC model; use source {' or '.join(ARRCOC_SOURCES)}")
        return value

    @model_validator(mode="after")
    def _stages_chain(self):
        problems, lora = [], None
        names = [s.name for s in self.stages]
        for i, stage in enumerate(self.stages):
            where = f"stages.{i} ({stage.name})"
            if names.count(stage.name) > 1:
                problems.append(f"{where}: stage name is used twice; names must be unique")
            data = stage.data or self.data
            if data is None:
                problems.append(f"{where}: no data; set data: at the pipeline or in the stage")
            elif data.task != "vqa":
                problems.append(f"{where}: data.task {data.task!r} is not vqa; ARR-COC stages read vqa data")
            if stage.strategy is not None:
                if lora is not None and stage.strategy != lora:
                    problems.append(f"{where}: a second, different LoRA; later stages reuse the first one")
                lora = lora or stage.strategy
            if "lora" in stage.train and lora is None:
                problems.append(f"{where}: trains lora but no stage up to here has strategy: {{type: lora}}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


register_kind("pipeline", PipelineSpec, "jobs.pipeline")

# Every kind is registered: the discriminated union of them all validates a spec.
JobSpec = Annotated[Union[tuple(KINDS.values())], Field(discriminator="kind")]
_ADAPTER = TypeAdapter(JobSpec)
