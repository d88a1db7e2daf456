"""The job spec: the pieces every kind shares, YAML loading, dotted overrides, validation.

Each kind's own model lives in launcher/kinds/<kind>.py; `validate` discriminates on `kind:` over
the kind registry. Every problem in a spec is reported at once, each with its field path, the bad
value and, for a misspelled key, the closest valid key; then what the kind does not run is refused.
"""

from __future__ import annotations

import difflib
import functools
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import (
    BaseModel,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from common.chat import CHAT_TEMPLATE_NAMES
from launcher.errors import ConfigError
from launcher.fields import (  # noqa: F401  (re-exported: the spec's building blocks)
    MAX_BATCH,
    MAX_CPUS,
    MAX_EPOCHS,
    MAX_GPUS,
    MAX_STEPS,
    NAME_PATTERN,
    EnvName,
    EnvValue,
    PathStr,
    Patterns,
    Strict,
)
from launcher.strategies import STRATEGIES as STRATEGY_REGISTRY
from launcher.tracking import Tracking

TASKS = ("causal_lm", "instruction", "chat", "classification", "ner", "vqa")


# ---------------------------------------------------------------------------------------------
# Model and strategy (each strategy's spec model lives in its file under launcher/strategies/)


MODEL_SOURCES = ("tiny-llama", "minilm", "arrcoc-mini", "arrcoc-7b", "llama-2-7b")


class ModelSpec(Strict):
    source: str = Field("tiny-llama", description="tiny-llama | minilm | hf:<local folder> | "
                        "hf:<org>/<name>[@<revision>] (from the local Hugging Face cache)")
    config: dict[str, Any] = Field(default_factory=dict, description="overrides of the model config")
    seq_len: int = Field(64, gt=0, le=32768)
    # transformers writes a label name per class into the config: a bound keeps that small.
    num_labels: Optional[int] = Field(None, gt=1, le=100_000, description="classification heads only")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="the attention kernel transformers uses (flash_attention_2 needs flash-attn)")

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        known = f"{', '.join(MODEL_SOURCES)}, or hf:<local model folder>"
        if value in MODEL_SOURCES:
            return value
        if value.startswith("hf:"):
            if not value[3:].strip() or any(ord(c) < 32 for c in value):
                raise ValueError("hf: needs the path of a local model folder (with config.json) or "
                                 "<org>/<name>[@<revision>] from the local Hugging Face cache")
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
    columns: dict[str, str] = Field(default_factory=dict, description="task role -> column name "
                                    "(text, label, instruction, response, input, system, messages)")
    chat_template: Optional[Literal[CHAT_TEMPLATE_NAMES]] = Field(
        None, description="a chat template the project ships, for a tokenizer without one of its own")
    packing: bool = Field(False, description="concatenate examples into seq_len rows (no attention "
                          "or loss across an example's boundary)")
    force: bool = Field(False, description="run even when the dataset is far too small")
    skip_bad_rows: int = Field(0, ge=0, le=10**9, description="rows of the train split that cannot be "
                               "used (null or non-string text, over max_row_chars, a malformed chat) "
                               "skipped and counted before the job fails on one")
    max_row_chars: int = Field(1_000_000, gt=0, description="a row with more characters is bad: "
                               "most likely a file whose lines are not rows (seq_len cuts every row)")


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
    preemption_grace_s: float = Field(30, gt=0, le=3600, description="after a SIGTERM (a spot reclaim, a "
                                      "drain), seconds a worker has to checkpoint at its next step before "
                                      "it exits; the retry or a resume continues from that step")
    precision: Optional[Literal["bf16", "fp16", "fp32"]] = Field(
        None, description="default: bf16 on GPUs, fp32 on CPU (bf16 autocast runs on CPU; fp16 needs a GPU)")
    grad_accumulation: int = Field(1, gt=0, le=MAX_BATCH, description="micro-batches per optimizer step "
                                   "(max_steps counts optimizer steps)")
    grad_checkpointing: bool = Field(False, description="recompute activations in backward (non-reentrant)")
    eval_generate: int = Field(64, ge=0, le=100_000, description="eval rows answered greedily for exact "
                               "match (instruction and chat tasks)")


class ResourcesSpec(Strict):
    workers: int = Field(2, gt=0, le=4096, description="Ray Train workers (ranks); {min: N, max: M}: elastic, "
                         "from N to M as the cluster has them (finetune, torch engine)")
    min_workers: Optional[int] = Field(None, gt=0, le=4096, description="elastic workers' least (workers is "
                                       "the most); the global batch stays that of `workers` ranks")
    cpus_per_worker: float = Field(0.5, gt=0, le=MAX_CPUS)
    gpus_per_worker: float = Field(0, ge=0, le=MAX_GPUS)
    custom_per_worker: dict[Annotated[str, StringConstraints(pattern=r"^[A-Za-z][A-Za-z0-9_:.\-]{0,63}$")],
                            Annotated[float, Field(gt=0, le=1e6, allow_inf_nan=False)]] = Field(
        default_factory=dict, description="custom Ray resources each worker asks, e.g. {spot: 1} on nodes "
        "started with --resources='{\"spot\": 4}' (not CPU, GPU or memory)")
    placement: Literal["pack", "spread"] = Field(
        "pack", description="pack: the workers on as few nodes as hold them; spread: one per node where "
        "the cluster has enough nodes (Ray Train's placement strategy)")
    data_tasks: Optional[int] = Field(
        None, gt=0, le=4096, description="Ray Data tasks at once per stage of the job's data stream (read, "
        "tokenize, pack); they ask no CPU, so jobs whose workers take every CPU still read. Default: one "
        "per worker")

    @model_validator(mode="before")
    @classmethod
    def _range(cls, data: Any) -> Any:
        """`workers: {min: N, max: M}` is min_workers N, workers M."""
        if isinstance(data, dict) and isinstance(data.get("workers"), dict):
            span = data["workers"]
            if set(span) != {"min", "max"}:
                raise ValueError(f"workers: {span!r} is not {{min: N, max: M}}; give both, or one number")
            data = {**data, "workers": span["max"], "min_workers": span["min"]}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "ResourcesSpec":
        if self.min_workers is not None and self.min_workers > self.workers:
            raise ValueError(f"workers: min {self.min_workers} is above max {self.workers}; "
                             "swap them, or give one number")
        if self.min_workers == self.workers:
            self.min_workers = None  # one size: not elastic
        named = sorted(set(self.custom_per_worker) & {"CPU", "GPU", "memory"})
        if named:
            instead = {"CPU": "cpus_per_worker", "GPU": "gpus_per_worker"}.get(named[0], "no such key")
            raise ValueError(f"custom_per_worker: {named[0]} is not a custom resource; use {instead}")
        return self


# Environment names that hold credentials: their values must be references, never literals.
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|ACCESS_?KEY|CREDENTIAL", re.I)


class JobBase(Strict):
    name: str = Field(pattern=NAME_PATTERN, description="lower-case letters, digits and '-'")
    storage: PathStr = Field("./runs", description="where run folders go: a folder, or s3://bucket/prefix "
                             "(pyarrow's options after ?)")
    storage_shared: bool = Field(False, description="storage is a folder every node of the cluster mounts "
                                 "(NFS, a shared volume): allowed on a multi-node cluster")
    env: dict[EnvName, EnvValue] = Field(
        default_factory=dict, description="environment for the job; secrets only as references: "
        "env:NAME (read from the cluster's environment) or secret:SECRET/KEY (Kubernetes)")
    pending_timeout: Optional[float] = Field(
        900, gt=0, description="seconds the job may wait for resources before it is stopped (null: no limit)")
    keep_checkpoints: bool = Field(False, description="keep the training checkpoints after the run succeeds "
                                   "(default: removed then; the export is the result)")
    tracking: Tracking = Field(default_factory=Tracking, description="log the run to MLflow and/or W&B: "
                               "params, every metrics record, summary, artifacts; a resume continues the same run")

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


# ---------------------------------------------------------------------------------------------
# Loading


def load_spec(source: Union[str, Path, dict], overrides: tuple[str, ...] = (),
              target: Optional[str] = None) -> BaseModel:
    """Read a spec from a YAML file (or a dict), apply `a.b=value` overrides, validate it.

    With a `target`, what the kind runs only elsewhere (a plan-only model source) is refused too.
    """
    label = str(source) if not isinstance(source, dict) else None
    data = read_yaml(source) if not isinstance(source, dict) else _deep_copy(source)
    for item in overrides:
        apply_override(data, item, label)
    spec = validate(data, label)
    if target is not None:
        from launcher.kinds import get_kind

        try:
            get_kind(spec.kind).check_target(spec.model_dump(mode="json"), target)
        except ConfigError as exc:
            raise ConfigError(exc.problems, label) from None
    return spec


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
        if isinstance(node, list):  # an item of a list by its index: stages.0.train.max_steps=20
            node = _item(node, part, item, source)
            continue
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, (dict, list)):
            raise ConfigError(f"override {item!r}: '{part}' is not a mapping in the spec", source)
        node = child
    if isinstance(node, list):
        node[int(_index(node, parts[-1], item, source))] = value
    else:
        node[parts[-1]] = value


def _index(items: list, part: str, item: str, source: Optional[str]) -> int:
    if not part.isdigit() or int(part) >= len(items):
        raise ConfigError(f"override {item!r}: '{part}' is no index of a list of {len(items)} "
                          f"(use 0 to {len(items) - 1})", source)
    return int(part)


def _item(items: list, part: str, item: str, source: Optional[str]) -> dict:
    child = items[_index(items, part, item, source)]
    if not isinstance(child, dict):
        raise ConfigError(f"override {item!r}: item '{part}' is not a mapping in the spec", source)
    return child


def validate(data: dict, source: Optional[str] = None) -> BaseModel:
    """The spec's kind model, or every problem at once; then every field the kind does not run."""
    kinds = _kinds()
    kind = data.get("kind")
    if not isinstance(kind, str) or kind not in kinds:
        hint = difflib.get_close_matches(str(kind), kinds, n=1)
        fix = f"did you mean '{hint[0]}'?" if hint else f"use one of: {', '.join(kinds)}"
        if kind is None and isinstance(data, dict):  # a misspelled key ("knd: finetune") is why
            key = next((k for k in data if difflib.get_close_matches(str(k), ["kind"], n=1, cutoff=0.6)), None)
            if key is not None:
                raise ConfigError(f"kind: missing; unknown key {key!r}: did you mean 'kind'?", source)
        got = "missing" if kind is None else repr(kind)
        raise ConfigError(f"kind: {got} is not a job kind; {fix}", source)
    try:
        spec = _adapter().validate_python(data)
    except ValidationError as exc:
        raise ConfigError([_describe(err) for err in exc.errors()], source) from None
    except ConfigError as exc:  # raised by a kind's own check inside its model (compare's variants)
        raise ConfigError(exc.problems, source) from None
    refused = kinds[kind].refusals(spec)
    if refused:
        raise ConfigError(refused, source)
    return spec


def _kinds() -> dict:
    # Imported here: the kind modules import this one for the shared models.
    from launcher.kinds import KINDS

    return KINDS


@functools.cache
def _adapter() -> TypeAdapter:
    """The discriminated union of every registered kind's model."""
    models = tuple(k.model for k in _kinds().values())
    return TypeAdapter(Annotated[Union[models], Field(discriminator="kind")])


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
        tag, choices = err["ctx"]["tag"], STRATEGIES if path == "strategy" else _kinds()
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
    """The bad value as an error line shows it: cut at 60 characters, a URI's credentials hidden."""
    text = re.sub(r"(?<=://)[^/@\s]+@", "***@", repr(value))
    return text if len(text) <= 60 else text[:57] + "..."


def _field_path(loc: tuple) -> list:
    """Drop the discriminator tags pydantic puts into locations of tagged-union members."""
    path = []
    for i, part in enumerate(loc):
        if i == 0 and part in _kinds() or i > 0 and loc[i - 1] == "strategy" and part in STRATEGIES:
            continue
        if i > 0 and isinstance(loc[i - 1], int) and part in _tagged_models():  # a stage's shape
            continue
        path.append(part)
    return path


@functools.cache
def _tagged_models() -> dict:
    """The members of the kinds' shape-discriminated unions (a pipeline's stages) by their tag."""
    from pydantic import Tag

    found, seen = {}, set()

    def walk(annotation):
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if annotation not in seen:
                seen.add(annotation)
                for field in annotation.model_fields.values():
                    walk(field.annotation)
                    for meta in field.metadata:
                        walk(meta)
            return
        for arg in typing.get_args(annotation):
            walk(arg)
        if typing.get_origin(annotation) is Annotated:
            base, *meta = typing.get_args(annotation)
            found.update({m.tag: base for m in meta if isinstance(m, Tag)})

    for kind in _kinds().values():
        walk(kind.model)
    return found


def _fields_at(loc: tuple) -> list[str]:
    """Valid keys of the model at a pydantic error location, for did-you-mean hints."""
    if not loc or loc[0] not in _kinds():
        return []
    model: Any = _kinds()[loc[0]].model
    for part in loc[1:]:
        if isinstance(model, type) and issubclass(model, BaseModel) and part in model.model_fields:
            model = _model_of(model.model_fields[part].annotation)
        elif part in STRATEGIES:
            model = STRATEGIES[part]
        elif isinstance(part, int):  # an item of a list of models (multitask tasks)
            continue
        elif part in _tagged_models():
            model = _tagged_models()[part]
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
