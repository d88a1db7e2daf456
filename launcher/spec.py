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


class DeepSpeedSpec(Strict):
    """The `deepspeed:` block of `engine: deepspeed` (field names shared with launcher/estimate.py)."""

    zero_stage: Literal[0, 1, 2, 3] = 0
    offload_optimizer: bool = Field(False, description="optimizer states in CPU memory (ZeRO 1-3)")
    offload_params: bool = Field(False, description="parameters in CPU memory (ZeRO-3 only)")
    precision: Optional[Literal["bf16", "fp32", "fp16"]] = Field(
        None, description="default: bf16 on GPUs, fp32 on CPU (fp16 is refused on CPU)"
    )
    grad_accumulation: int = Field(1, gt=0, description="micro-batches per optimizer step")
    activation_checkpointing: bool = False


class JobBase(Strict):
    name: str = Field(pattern=NAME_PATTERN, description="lower-case letters, digits and '-'")
    storage: str = "./runs"
    env: dict[str, str] = Field(default_factory=dict, description="environment for the job")


class FinetuneSpec(JobBase):
    kind: Literal["finetune"]
    model: ModelSpec = Field(default_factory=ModelSpec)
    strategy: _union(STRATEGIES.values()) = Field(discriminator="type")
    engine: Literal["torch", "deepspeed"] = "torch"
    deepspeed: Optional[DeepSpeedSpec] = None
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
