"""What a job kind is: one registered `Kind` per kind, carrying everything the client knows of it.

launcher/kinds/<kind>.py holds the kind's spec model and registers one object: its job module (and
engine variants), what it runs (data tasks, model sources, strategies, fields), path resolution,
data checks, the estimate, the worker layout, and how plan, the summary and the report show it.
The rest of the client asks the registry (`get_kind`) and never tests a kind's name or keys.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

from pydantic import BaseModel

from common.registry import add, import_package_modules
from launcher.errors import ConfigError, PlanError

HF = "hf:"  # in a list of sources: any hf:<local model folder>


@dataclasses.dataclass(frozen=True)
class Engine:
    """One way a kind's job runs: its module, and what that module runs. Whatever is not listed
    here is refused at validate, so that no field is silently ignored on the cluster."""

    name: str
    job_module: str
    tasks: tuple[str, ...]
    sources: tuple[str, ...]
    strategies: Optional[tuple[str, ...]] = None  # None: every registered strategy
    ignores: tuple[str, ...] = ()  # dotted spec fields this engine does not run: refused when set
    elastic: bool = False  # runs resources.workers {min, max} (Ray Train's elastic worker group)


class Kind:
    """The base of every kind: the capability checks and the defaults most kinds share.

    A subclass sets the class attributes and writes the planner and reporting hooks below.
    """

    name: str
    model: type[BaseModel]
    engines: dict[str, Engine]  # by the spec's `engine:` value; the first is the default
    plan_only: dict[str, str] = {}  # model source -> what the job does with it on a cluster
    trains: str = ""  # completes "kind X trains <task> ...", for the hints of other kinds' refusals
    throughput_unit = "tokens/s"
    report_on_finish = False  # jobs/run.py writes the run's report when the run ends

    # -- the job ----------------------------------------------------------------------------------

    def engine(self, spec: Any) -> Engine:
        name = spec.get("engine") if isinstance(spec, dict) else getattr(spec, "engine", None)
        return self.engines[name or next(iter(self.engines))]

    def job_module(self, spec: dict) -> str:
        """The cluster-side module that runs this spec (jobs/run.py imports it by this name)."""
        return self.engine(spec).job_module

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(t for e in self.engines.values() for t in e.tasks))

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s for e in self.engines.values() for s in e.sources))

    # -- declared capabilities ----------------------------------------------------------------------

    def datasets(self, spec: BaseModel) -> list[tuple[str, Any]]:
        """(field path, DataSpec) of every dataset block the spec holds."""
        data = getattr(spec, "data", None)
        return [("data", data)] if data is not None else []

    def refusals(self, spec: BaseModel) -> list[str]:
        """Everything this valid spec asks that its kind or engine does not run, one line each."""
        engine, found = self.engine(spec), []
        for where, data in self.datasets(spec):
            found += self._task_refusal(f"{where}.task", data.task, engine)
        found += self._source_refusal(spec.model.source, engine)
        strategy = getattr(getattr(spec, "strategy", None), "type", None)
        if engine.strategies is not None and strategy not in engine.strategies:
            other = self._other_engines(lambda e: e.strategies is None or strategy in e.strategies)
            found.append(f"engine: {engine.name} does not run strategy {strategy}; use strategy "
                         f"{' or '.join(engine.strategies)}{other}")
        for field in engine.ignores:
            if _is_set(spec, field):
                fix = self._other_engines(lambda e: field not in e.ignores).replace(", or ", "use ")
                found.append(f"engine: {engine.name} does not run {field}; {fix or 'remove it'}")
        if getattr(getattr(spec, "resources", None), "min_workers", None) and not engine.elastic:
            found.append(f"resources.workers: {{min, max}} (elastic workers) runs on kind finetune's torch engine "
                         f"only, not {self.name}'s {engine.name}; give workers one number")
        return found + training_refusals(spec) + self.own_refusals(spec)

    def own_refusals(self, spec: BaseModel) -> list[str]:
        """The kind's own refusals beyond tasks, sources, strategies and engine fields."""
        return []

    def models(self, spec: dict) -> dict[str, dict]:
        """Every model block of a spec dict by its field path (a compare adds its variants')."""
        return {"model": spec.get("model") or {}}

    def check_target(self, spec: dict, target: str) -> list[str]:
        """Refuse a plan-only model source on the local target, and flash attention where its package
        is missing; elsewhere, warn what it needs."""
        warnings = []
        for where, model in self.models(spec).items():
            if model.get("attn_implementation") == "flash_attention_2":
                if target == "local" and not _flash_attn_installed():
                    raise ConfigError(f"{where}.attn_implementation: flash_attention_2 needs the flash-attn "
                                      "package, which is not installed here (pip install flash-attn); use sdpa")
                if target != "local":
                    warnings.append(f"{where}.attn_implementation: flash_attention_2 needs flash-attn on the "
                                    "cluster's workers; the job stops at start without it")
            source = model.get("source")
            if source not in self.plan_only:
                continue
            if target == "local":
                raise ConfigError(
                    f"{where}.source: {source} has no weights here and is planned for a cluster only; "
                    f"plan it with --target ray (or k8s), or use {_names(self.sources)} to run it here")
            warnings.append(f"{where}.source: {source}: {self.plan_only[source]}")
        return warnings

    def _task_refusal(self, field: str, task: str, engine: Engine) -> list[str]:
        if task in engine.tasks:
            return []
        if task in self.tasks:
            return [f"{field}: {task} is not run by engine {engine.name}; use {' or '.join(engine.tasks)}"
                    f"{self._other_engines(lambda e: task in e.tasks)}"]
        others = [k for k in KINDS.values() if k is not self and task in k.tasks and k.trains]
        hint = f" (kind {others[0].name} trains {task} {others[0].trains})" if others else ""
        return [f"{field}: {task} is not run by kind {self.name} yet; use {' or '.join(self.tasks)}{hint}"]

    def _source_refusal(self, source: str, engine: Engine) -> list[str]:
        if _runs(engine.sources, source) or source in self.plan_only:
            return []
        if _runs(self.sources, source):
            return [f"model.source: {source} is not run by engine {engine.name}; use {_names(engine.sources)}"
                    f"{self._other_engines(lambda e: _runs(e.sources, source))}"]
        others = [k.name for k in KINDS.values() if k is not self and _runs(k.sources, source)]
        hint = f" (kind {others[0]} runs {source})" if others else ""
        return [f"model.source: {source} is not run by kind {self.name}; use {_names(self.sources)}{hint}"]

    def _other_engines(self, runs: Callable[[Engine], bool]) -> str:
        names = [e.name for e in self.engines.values() if runs(e)]
        return f", or engine: {names[0]}" if names else ""

    # -- planning (spec dicts, as plan() resolves them) -------------------------------------------

    def resolve_paths(self, spec: dict, resolve: Callable[[str], str]) -> None:
        raise NotImplementedError

    def prepare(self, spec: dict) -> tuple[Optional[dict], list[str]]:
        """The engine's config (None: no engine config) and lint warnings; fills defaults in place."""
        return None, []

    def check_data(self, spec: dict, target: str) -> tuple[dict, list[str]]:
        raise NotImplementedError

    def estimate(self, spec: dict, profile: Optional[str], strict: bool) -> tuple[Optional[dict], list[str]]:
        raise NotImplementedError

    def without_preflight(self, spec: dict) -> list[str]:
        """What plan needs when the datasets are not read (preflight off); warnings."""
        return []

    def resources(self, spec: dict, estimate: Optional[dict]) -> dict:
        raise NotImplementedError

    # -- showing it --------------------------------------------------------------------------------

    def label(self, spec: dict) -> str:
        """What `ftlaunch plan` shows beside the kind: `kind  finetune (lora)`."""
        return (spec.get("strategy") or {}).get("type", "-")

    def data_lines(self, data: dict) -> list[str]:
        """The plan's lines of what the footer checks found, one per dataset role."""
        return [f"data.{role:<8} {found['rows']:,} rows in {found['files']} file(s)"
                + "".join(f", {r} from column '{c}'" for r, c in found.get("columns", {}).items())
                for role, found in data.items()]

    def describe(self, spec: dict, estimate: Optional[dict]) -> list[str]:
        """The kind's lines of `ftlaunch plan`, after the datasets."""
        return [f"steps         {(spec.get('train') or {}).get('max_steps')}"]

    def format_estimate(self, estimate: dict) -> str:
        raise NotImplementedError

    def summary(self, manifest: dict, summary: dict) -> str:
        raise NotImplementedError

    def sections(self, run_dir: Path, manifest: dict) -> list:
        """The report's sections (launcher.report.Section): one per curve of the run."""
        raise NotImplementedError

    def spec_lines(self, spec: dict) -> list[str]:
        """The report's spec lines beyond model, strategy, data, train and resources."""
        return []

    def rate_unit(self, manifest: dict) -> str:
        """The unit of a run's throughput curves."""
        return self.throughput_unit

    def report_blocks(self, run_dir: Path, manifest: dict, out: Path) -> list:
        """The report's kind-specific blocks after its header (a compare run's table); figures in `out`."""
        return []

    def planned_memory(self, manifest: dict, profile: Optional[str]) -> dict:
        """The planner's memory per worker (bytes) by section name, for the report."""
        raise NotImplementedError

    def recorded_estimate(self, manifest: dict, profile: Optional[str]) -> Optional[dict]:
        """The plan's estimate of a run. A submitted plan travels without it (it is large), so it is
        recomputed from the recorded spec as `plan` made it: pure, but it needs the training extra."""
        est = (manifest.get("plan") or {}).get("estimate")
        if est is None:
            est, _ = self.estimate(json.loads(json.dumps(manifest.get("spec") or {})), profile, strict=False)
        return est


KINDS: dict[str, Kind] = {}


def register_kind(kind: Kind) -> Kind:
    """One registration per job kind; a second one of the same name fails at import."""
    return add(KINDS, kind.name, kind, "job kind")


def get_kind(name: Optional[str]) -> Kind:
    if name not in KINDS:
        raise PlanError(f"kind {name!r} is not a job kind; use one of: {', '.join(KINDS)}")
    return KINDS[name]


def path_resolver(base: Path) -> Callable[[str], str]:
    """Relative paths against `base`; absolute paths and URIs stay as they are."""
    return lambda value: value if "://" in value or os.path.isabs(value) else str((base / value).resolve())


def resolve_data(data: Optional[dict], resolve: Callable[[str], str]) -> None:
    """A data block's dataset paths, in place."""
    if not data:
        return
    for role in ("train", "eval", "retain"):
        if data.get(role) is not None:
            data[role] = resolve(data[role])
    if (data.get("replay") or {}).get("path") is not None:
        data["replay"]["path"] = resolve(data["replay"]["path"])


def resolve_model(model: Optional[dict], resolve: Callable[[str], str]) -> None:
    """An hf: model folder, in place: the job loads it from its own working directory. A hub id
    (`hf:<org>/<name>[@<revision>]`) that is no folder becomes its snapshot folder in the local
    Hugging Face cache; one that is not there either stays a path (preflight says which it is not)."""
    from common import hfsource

    if model and str(model.get("source", "")).startswith(HF):
        value = model["source"][len(HF):]
        try:
            folder = hfsource.resolve(value, resolve)
        except hfsource.NotInCache:
            folder = resolve(os.path.expanduser(value))
        model["source"] = HF + folder


def layout(workers: int, res: dict) -> dict:
    """The plan's `resources`: what the job holds at most."""
    cpus, gpus = res.get("cpus_per_worker", 1), res.get("gpus_per_worker", 0)
    held = {"workers": workers, "cpus_per_worker": cpus, "gpus_per_worker": gpus,
            "total_cpus": workers * cpus, "total_gpus": workers * gpus}
    if res.get("min_workers"):  # elastic: it starts with what the cluster has, from min_workers
        held["min_workers"] = res["min_workers"]
    if res.get("custom_per_worker"):
        held["custom_per_worker"] = res["custom_per_worker"]
    if "data_tasks" in res:  # a Ray Train job's data stream (jobs/data/read.py stream_tasks)
        held["data_tasks"] = res["data_tasks"] or workers
    return held


def check_datasets(entries, target: str) -> tuple[dict, list[str]]:
    """Footer checks of `(prefix, role, path, data)` entries (prefix: "" or "tasks.<name>." ...),
    each path read once. A path this machine cannot see on a remote target is warned about, not
    refused (it may live on the cluster's shared volume). Returns `{(prefix, role): {"rows",
    "files", "columns"?}}` and the warnings; an error names its prefix (several tasks share role names)."""
    from launcher.datacheck import check_dataset

    found, warnings, seen = {}, [], {}
    for prefix, role, path, data in entries:
        if not path:
            continue
        if not visible(path, target):
            warnings.append(f"{prefix}data.{role}: {path} is not visible here; not checked before submit")
            continue
        if path not in seen:
            try:
                info = check_dataset(path, data["task"], role=role, columns=data.get("columns"),
                                     skip_bad_rows=int(data.get("skip_bad_rows") or 0))
            except Exception as exc:
                if not prefix:
                    raise
                raise type(exc)(f"{prefix.rstrip('.')}: {exc}") from None
            # the roles read from a column of another name (data.columns, a known layout)
            renamed = {r: c for r, c in info.columns.items() if r != c}
            seen[path] = {"rows": info.rows, "files": info.files, **({"columns": renamed} if renamed else {})}
        found[(prefix, role)] = seen[path]
    return found, warnings


def visible(path: str, target: str) -> bool:
    """Whether a dataset can be checked from here: for a remote target a local path this machine
    cannot see may live on the cluster (a shared volume)."""
    return target == "local" or "://" in path or os.path.exists(path)


def _runs(sources: tuple[str, ...], source: str) -> bool:
    return source in sources or (HF in sources and source.startswith(HF))


def _names(sources: tuple[str, ...]) -> str:
    shown = [f"{s}<folder>" if s == HF else s for s in sources]
    return ", ".join(shown[:-1]) + f" or {shown[-1]}" if len(shown) > 1 else shown[0]


def _value(model: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        model = getattr(model, part, None)
    return model


def _is_set(spec: BaseModel, dotted: str) -> bool:
    """Whether a spec sets a field to something other than its default (False, 1, None, [])."""
    *parents, name = dotted.split(".")
    parent = _value(spec, ".".join(parents)) if parents else spec
    value = getattr(parent, name, None)
    if value in (None, [], {}):
        return False
    field = type(parent).model_fields.get(name) if isinstance(parent, BaseModel) else None
    return field is None or value != field.get_default(call_default_factory=True)


def training_refusals(spec: BaseModel) -> list[str]:
    """What the training settings ask that the hardware or the strategy cannot run, one line each."""
    from launcher.strategies import STRATEGIES

    train, res, found = getattr(spec, "train", None), getattr(spec, "resources", None), []
    gpus = getattr(res, "gpus_per_worker", 0) or 0
    if getattr(train, "precision", None) == "fp16" and not gpus:
        found.append("train.precision: fp16 needs a GPU (gpus_per_worker > 0); use bf16 or fp32")
    model = getattr(spec, "model", None)
    if getattr(model, "attn_implementation", None) == "flash_attention_2" and not gpus:
        found.append("model.attn_implementation: flash_attention_2 needs a GPU (gpus_per_worker > 0); use sdpa")
    strategy = STRATEGIES.get(getattr(getattr(spec, "strategy", None), "type", None))
    if getattr(train, "grad_checkpointing", False) and strategy is not None and strategy.no_checkpointing:
        found.append(f"train.grad_checkpointing: strategy {strategy.name} cannot train with it "
                     f"({strategy.no_checkpointing}); set train.grad_checkpointing: false or use lora or prompt")
    return found


def _flash_attn_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


# Every file of this package registers one kind on import.
import_package_modules(__name__, __path__, first=("finetune", "compare", "multitask", "pipeline"))
