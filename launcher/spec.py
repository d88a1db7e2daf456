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
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from launcher.errors import ConfigError

NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$"
TASKS = ("causal_lm", "instruction", "classification", "ner", "vqa")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


# ---------------------------------------------------------------------------------------------
# Model and strategy


class ModelSpec(Strict):
    source: str = Field("tiny-llama", description="tiny-llama | minilm | hf:<local path>")
    config: dict[str, Any] = Field(default_factory=dict, description="overrides of the model config")
    seq_len: int = Field(64, gt=0, le=32768)
    num_labels: Optional[int] = Field(None, gt=1, description="classification heads only")

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        known = ("tiny-llama", "minilm", "arrcoc-mini", "arrcoc-7b", "llama-2-7b")
        if value in known or value.startswith("hf:"):
            return value
        hint = difflib.get_close_matches(value, known, n=1)
        fix = f"did you mean '{hint[0]}'?" if hint else f"use one of {', '.join(known)} or hf:<path>"
        raise ValueError(f"unknown model source; {fix}")


class FullStrategy(Strict):
    type: Literal["full"]


class LoraStrategy(Strict):
    type: Literal["lora"]
    r: int = Field(8, gt=0, le=1024)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"


STRATEGIES: dict[str, type[Strict]] = {}


def register_strategy(model: type[Strict]) -> type[Strict]:
    """One registration per strategy: its `type:` tag maps to its spec model. Duplicates fail."""
    name = typing.get_args(model.model_fields["type"].annotation)[0]
    if name in STRATEGIES:
        raise RuntimeError(f"strategy {name!r} is registered twice")
    STRATEGIES[name] = model
    return model


for _model in (FullStrategy, LoraStrategy):
    register_strategy(_model)


def _union(models):
    return Annotated[Union[tuple(models)], Field(discriminator="type")]


# ---------------------------------------------------------------------------------------------
# Data, training, resources


class ReplaySpec(Strict):
    path: str
    fraction: float = Field(0.2, gt=0, lt=1)


class DataSpec(Strict):
    task: Literal[TASKS] = "causal_lm"
    train: str
    eval: Optional[str] = None
    retain: Optional[str] = None
    replay: Optional[ReplaySpec] = None
    columns: dict[str, str] = Field(default_factory=dict, description="task role -> column name")
    force: bool = Field(False, description="run even when the dataset is far too small")


class TrainSpec(Strict):
    max_steps: Optional[int] = Field(None, gt=0, description="default: from epochs and row counts")
    epochs: float = Field(1.0, gt=0, description="used when max_steps is not set")
    micro_batch: int = Field(8, gt=0)
    lr: float = Field(2e-4, gt=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    grad_clip: Optional[float] = Field(1.0, gt=0)
    report_every: int = Field(20, gt=0, description="steps between reports and checkpoints")
    eval_batches: int = Field(4, ge=0, description="batches of the eval split at each report")
    seed: int = 0


class ResourcesSpec(Strict):
    workers: int = Field(2, gt=0, le=4096)
    cpus_per_worker: float = Field(0.5, gt=0)
    gpus_per_worker: float = Field(0, ge=0)


class JobBase(Strict):
    name: str = Field(pattern=NAME_PATTERN, description="lower-case letters, digits and '-'")
    storage: str = "./runs"
    env: dict[str, str] = Field(default_factory=dict, description="environment for the job")


class FinetuneSpec(JobBase):
    kind: Literal["finetune"]
    model: ModelSpec = Field(default_factory=ModelSpec)
    strategy: _union(STRATEGIES.values()) = Field(discriminator="type")
    engine: Literal["torch"] = "torch"
    data: DataSpec
    train: TrainSpec = Field(default_factory=TrainSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)


KINDS: dict[str, type[Strict]] = {}
JOB_MODULES: dict[str, str] = {}  # kind -> the cluster-side module that runs it (by name only)


def register_kind(name: str, model: type[Strict], job_module: str) -> None:
    """One registration per job kind: its spec model and its job module. Duplicates fail."""
    if name in KINDS:
        raise RuntimeError(f"job kind {name!r} is registered twice")
    KINDS[name] = model
    JOB_MODULES[name] = job_module


register_kind("finetune", FinetuneSpec, "jobs.finetune")
JobSpec = Annotated[Union[tuple(KINDS.values())], Field(discriminator="kind")]
_ADAPTER = TypeAdapter(JobSpec)


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
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: YAML error{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a spec is a YAML mapping with a 'kind:' key, got {type(data).__name__}")
    return data


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
    if kind not in KINDS:
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
    path = ".".join(str(p) for p in loc) or "(top level)"
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
    msg = err["msg"].removeprefix("Value error, ")
    if kind == "union_tag_invalid":
        tag, choices = err["ctx"]["tag"], STRATEGIES if path == "strategy" else KINDS
        hint = difflib.get_close_matches(str(tag), choices, n=1)
        fix = f"did you mean '{hint[0]}'?" if hint else f"use one of: {', '.join(choices)}"
        return f"{path}.{err['ctx']['discriminator'].strip(chr(39))}: {tag!r} is unknown; {fix}"
    return f"{path}: {msg} (got {_short(err.get('input'))})"


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
        else:
            return []
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
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
    steps: int = Field(gt=0)
    micro_batch: int = Field(16, gt=0)
    report_every: int = Field(10, gt=0, description="steps between reports and checkpoints")
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
    eval_rows: int = Field(128, ge=0, description="rows of the eval split scored after each stage")
    seed: int = 0


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
JobSpec = Annotated[Union[tuple(KINDS.values())], Field(discriminator="kind")]
_ADAPTER = TypeAdapter(JobSpec)
