"""`kind: pipeline`: stages run one after another, each starting from the previous stage's result.

Two kinds of stages, by the model: an ARR-COC model's stages name its parameter groups
(jobs/pipeline.py); any model the finetune kind runs has finetune stages, each a finetune fragment
(strategy, data, train, resources) run by jobs/stages.py as the finetune job (launcher/stages.py
chains them). Its spec model, what its stages run, their data checks, the per-stage estimate, the
worker layout (the largest stage's), and how plan, the summary and the report show it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from launcher import stages as chain
from launcher.errors import ConfigError
from launcher.kinds import Engine, Kind, check_datasets, layout, register_kind, resolve_data, resolve_model
from launcher.kinds import pipeline_stages as S
from launcher.kinds.finetune import FINETUNE, LrGroup, MitigationSpec
from launcher.spec import (
    MAX_BATCH,
    MAX_STEPS,
    DataSpec,
    JobBase,
    MaxFailures,
    ModelSpec,
    ResourcesSpec,
    Strict,
    TrainSpec,
)
from launcher.strategies import spec_union
from launcher.strategies.lora import LoraStrategy

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


class FinetuneStage(Strict):
    """A stage of any model the finetune kind runs: a finetune fragment that starts from the
    previous stage's result (launcher/stages.py). What trains is its strategy's (freeze and
    gradual-unfreeze patterns, adapters)."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,30}$", description="lower-case, '-', '_'")
    strategy: spec_union()
    data: Optional[DataSpec] = Field(None, description="default: the pipeline's data")
    train: TrainSpec = Field(default_factory=TrainSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    lr_groups: Optional[Union[Literal["default"], list[LrGroup]]] = None
    mitigation: MitigationSpec = Field(default_factory=MitigationSpec)
    merge: bool = Field(False, description="merge the stage's adapter into its base: the next stage starts "
                        "from the merged model (default: from the base with this adapter, trained on)")
    new_adapter: bool = Field(False, description="train an adapter of its own on the base the previous stage's "
                              "adapter sits on; that adapter is kept and still answers its stage's eval split "
                              "(default: train the previous stage's adapter on)")


ARRCOC_STAGE, FINETUNE_STAGE = "arrcoc-stage", "finetune-stage"


def _stage_shape(value: Any) -> str:
    """An ARR-COC stage names its groups (`train: [texture]`) and its `steps`; a finetune stage has
    a `train:` block of settings. The pipeline checks the shape fits its model."""
    get = value.get if isinstance(value, dict) else lambda k: getattr(value, k, None)
    return ARRCOC_STAGE if isinstance(get("train"), list) or get("steps") is not None else FINETUNE_STAGE


Stage = Annotated[Union[Annotated[StageSpec, Tag(ARRCOC_STAGE)], Annotated[FinetuneStage, Tag(FINETUNE_STAGE)]],
                  Discriminator(_stage_shape)]


def source_of(spec) -> str:
    """The pipeline's model source, of a spec model or dict (no `model:` means ARR-COC's mini)."""
    model = spec.get("model") if isinstance(spec, dict) else spec.model
    if model is None:
        return "arrcoc-mini"
    if isinstance(model, dict):
        return model.get("source", "tiny-llama")
    return getattr(model, "source", None)  # a malformed model: its own field error reports it


def is_arrcoc(spec) -> bool:
    return source_of(spec) in ARRCOC_SOURCES


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
    train: Optional[PipelineTrainSpec] = Field(None, description="ARR-COC stages' shared settings (default "
                                               "filled); a finetune stage has its own train:")
    stages: list[Stage] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _stages_fit_the_model(cls, data):
        """A stage of the other shape is named before its fields are (they would all be wrong)."""
        if not isinstance(data, dict) or not isinstance(data.get("stages"), list):
            return data
        arrcoc, found = is_arrcoc(data), []
        for i, stage in enumerate(data["stages"]):
            if not isinstance(stage, dict):
                continue
            where, shape = f"stages.{i} ({stage.get('name')})", _stage_shape(stage)
            if arrcoc and shape == FINETUNE_STAGE:
                found.append(f"{where}: an ARR-COC stage names its groups and steps "
                             f"(train: [{', '.join(PARAM_GROUPS)}], steps: N)")
            elif not arrcoc and shape == ARRCOC_STAGE:
                found.append(f"{where}: train: {stage.get('train')} names ARR-COC groups, but model.source "
                             f"{source_of(data)} is no ARR-COC model; its stages are finetune fragments "
                             "(strategy:, data:, train: {max_steps: N})")
        if found:
            raise ValueError("; ".join(found))
        return data

    @model_validator(mode="after")
    def _stages_chain(self):
        names = [s.name for s in self.stages]
        problems = [f"stages.{i} ({n}): stage name is used twice; names must be unique"
                    for i, n in enumerate(names) if names.count(n) > 1]
        if not problems and is_arrcoc(self):
            problems = self._arrcoc_problems()
            self.train = self.train or PipelineTrainSpec()
        if problems:
            raise ValueError("; ".join(problems))
        found = [] if is_arrcoc(self) else self._finetune_problems()
        if found:
            raise ConfigError(found)  # one line each, with its stage
        return self

    def _finetune_problems(self) -> list[str]:
        """Each stage must be a valid finetune (its refusals included) and the chain must hold."""
        from launcher.spec import validate

        if self.train is not None:
            return ["train: a finetune pipeline's settings are its stages'; move them into each stage's train:"]
        spec, problems = self.model_dump(mode="json"), []
        for i, stage in enumerate(self.stages):
            if stage.data is None and self.data is None:
                problems.append(f"stages.{i} ({stage.name}): no data; set data: at the pipeline or in the stage")
                continue
            try:
                validate(chain.stage_spec(spec, i))
            except ConfigError as exc:
                problems += [f"stages.{i} ({stage.name}): {p}" for p in exc.problems]
        return problems + chain.chain_problems(spec)

    def _arrcoc_problems(self) -> list[str]:
        problems, lora = [], None
        for i, stage in enumerate(self.stages):
            where = f"stages.{i} ({stage.name})"
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
        return problems


class Pipeline(Kind):
    name = "pipeline"
    model = PipelineSpec
    # jobs/pipeline.py reads the columns image, question and answer of train and eval, nothing else.
    engines = {"pipeline": Engine("pipeline", "jobs.pipeline", tasks=("vqa",), sources=("arrcoc-mini",))}
    plan_only = {"arrcoc-7b": "the job builds it from its config with random weights (no pretrained "
                              "ARR-COC weights ship with ftlaunch)"}
    trains = "on an ARR-COC model"
    throughput_unit = "rows/s"

    def job_module(self, spec: dict) -> str:
        # A finetune pipeline's stages are finetune runs: jobs/stages.py runs them with jobs/finetune.py.
        return super().job_module(spec) if is_arrcoc(spec) else "jobs.stages"

    def rate_unit(self, manifest: dict) -> str:
        return self.throughput_unit if is_arrcoc(manifest.get("spec") or {}) else "tokens/s"

    def refusals(self, spec) -> list[str]:
        # A finetune stage was validated as the finetune it is (its refusals included) by the model.
        return super().refusals(spec) if is_arrcoc(spec) else []

    def datasets(self, spec) -> list:
        stages = [(f"stages.{i}.data", s.data) for i, s in enumerate(spec.stages) if s.data is not None]
        return ([("data", spec.data)] if spec.data is not None else []) + stages

    def own_refusals(self, spec) -> list[str]:
        found = []
        if spec.model.num_labels:
            found.append(f"model.num_labels: {spec.model.num_labels} is not run by kind pipeline "
                         "(ARR-COC answers from its LLM, no classifier head); remove it")
        for where, data in self.datasets(spec):
            if data.retain:
                found.append(f"{where}.retain: {data.retain} is not run by kind pipeline (a stage is scored "
                             "on its eval split only); remove it")
            if data.replay:
                found.append(f"{where}.replay: {data.replay.path} is not run by kind pipeline; remove it")
            if data.columns:
                found.append(f"{where}.columns: {data.columns} is not run by kind pipeline (its stages read "
                             "the columns image, question and answer); rename the dataset's columns")
        return found

    def resolve_paths(self, spec: dict, resolve) -> None:
        resolve_data(spec.get("data"), resolve)
        for stage in spec["stages"]:
            resolve_data(stage.get("data"), resolve)
        resolve_model(spec["model"], resolve)

    def prepare(self, spec: dict) -> tuple[Optional[dict], list[str]]:
        if is_arrcoc(spec):
            return None, []
        lint = [f"stages.{s['name']}: {w}" for i, s in enumerate(spec["stages"])
                for w in FINETUNE.prepare(chain.stage_spec(spec, i))[1]]
        return None, lint

    def check_data(self, spec: dict, target: str) -> tuple[dict, list[str]]:
        """The datasets, stage by stage (a stage without `data:` reads the pipeline's)."""
        from launcher.datacheck import sufficiency

        if not is_arrcoc(spec):
            return S.check_stages(spec, target)

        # The stages train adapters only (texture adapter, LoRA) unless one trains the LLM or vision.
        peft = not any({"llm", "vision"} & set(s["train"]) for s in spec["stages"])
        datas = {s["name"]: s.get("data") or spec["data"] for s in spec["stages"]}
        entries = [(f"stages.{name}.", role, data.get(role), data) for name, data in datas.items()
                   for role in ("train", "eval")]
        checked, warnings = check_datasets(entries, target)
        sized = {}  # each train set's size warned about once, however many stages read it
        for (prefix, role), info in checked.items():
            data = datas[prefix[len("stages."):-1]]
            if role == "train" and data["train"] not in sized:
                sized[data["train"]] = True
                warnings += sufficiency(data["task"], info["rows"], peft=peft, force=data.get("force", False))
        return {f"{prefix[len('stages.'):-1]}.{role}": info for (prefix, role), info in checked.items()}, warnings

    def estimate(self, spec: dict, profile: Optional[str], strict: bool):
        """One estimate per stage; the pipeline fits when every stage fits."""
        from launcher.preflight import judged

        if not is_arrcoc(spec):
            return S.estimate_stages(spec, profile, strict)

        def run():
            from launcher.planner import estimate_pipeline

            return estimate_pipeline(spec, profile)

        return judged(run, strict)

    def without_preflight(self, spec: dict) -> list[str]:
        return [] if is_arrcoc(spec) else [w for i in range(len(spec["stages"]))
                                           for w in FINETUNE.without_preflight(chain.stage_spec(spec, i))]

    def resources(self, spec: dict, estimate: Optional[dict]) -> dict:
        # Stages run one at a time: the job needs its largest stage's.
        res = max((st["resources"] for st in spec["stages"]),
                  key=lambda r: (r["workers"] * r["gpus_per_worker"], r["workers"] * r["cpus_per_worker"]))
        return layout(res["workers"], res)

    def label(self, spec: dict) -> str:
        if is_arrcoc(spec):
            return spec["model"]["source"]
        return " -> ".join(s["strategy"]["type"] for s in spec["stages"])

    def describe(self, spec: dict, estimate: Optional[dict]) -> list[str]:
        if not is_arrcoc(spec):
            return [f"stage         {S.stage_line(spec, i)}, {s['resources']['workers']} x "
                    f"({s['resources']['cpus_per_worker']} CPU, {s['resources']['gpus_per_worker']} GPU)"
                    for i, s in enumerate(spec["stages"])]
        return [f"stage         {s['name']}: trains {'+'.join(s['train'])}, {s['steps']} steps, "
                f"{s['resources']['workers']} x ({s['resources']['cpus_per_worker']} CPU, "
                f"{s['resources']['gpus_per_worker']} GPU)" for s in spec["stages"]]

    def format_estimate(self, estimate: dict) -> str:
        from launcher.planner import format_estimate, format_pipeline_estimate

        if "parameters" in estimate["stages"][0] and "groups" in estimate["stages"][0]["parameters"]:
            return format_pipeline_estimate(estimate)
        lines = [f"pipeline of {len(estimate['stages'])} finetune stage(s), model {estimate['model']}"]
        for e in estimate["stages"]:
            lines += ["", f"stage {e['stage']}", *format_estimate(e).splitlines()]
        return "\n".join(lines)

    def summary(self, manifest: dict, s: dict) -> str:
        from common.units import metric as _f

        if not is_arrcoc(manifest.get("spec") or {}):
            return S.stages_summary(manifest, s)
        stages = s.get("stages") or {}
        lines = [f"run            {manifest.get('run_id')}",
                 f"accuracy       {_f(s.get('accuracy_before'))} -> {_f(s.get('accuracy_after'))} "
                 f"over {len(stages)} stages; K random patches instead of the adapter's: "
                 f"{_f(s.get('accuracy_random_before'))} -> {_f(s.get('accuracy_random_after'))}"]
        for name, st in stages.items():
            lines.append(f"  stage {name:<12} {st.get('steps')} steps, accuracy {_f(st.get('accuracy_before'))} -> "
                         f"{_f(st.get('accuracy_after'))} (random K {_f(st.get('accuracy_random_after'))}), "
                         f"loss {_f(st.get('loss_last'))}, {st.get('trainable_params') or 0:,} trainable")
        lines += [f"wall time      {s.get('wall_time_s')} s",
                  f"artifacts      {manifest.get('plan', {}).get('run_dir', '?')} (pipeline.json, stages/)"]
        return "\n".join(lines)

    def sections(self, run_dir: Path, manifest: dict) -> list:
        from common.units import pct as _pct
        from launcher.report import Section, loss_facts, read_json, read_jsonl

        if not is_arrcoc(manifest.get("spec") or {}):
            return S.stage_sections(run_dir, manifest)
        entries = {e["name"]: e for e in read_json(run_dir / "pipeline.json").get("stages", [])}
        metrics = read_jsonl(run_dir / "metrics.jsonl")
        out = []
        for stage in (manifest.get("spec") or {}).get("stages", []):
            name = stage["name"]
            e = entries.get(name, {})
            s = Section(f"stage {name}", name, [m for m in metrics if m.get("stage") == name],
                        e.get("status", "not started"), e.get("error"))
            points = [(0, e["accuracy_before"])] if e.get("accuracy_before") is not None else []
            points += [(m["step"], m["accuracy"]) for m in s.metrics if m.get("accuracy") is not None]
            if points:
                s.evals["eval accuracy"] = points
            s.facts = loss_facts(s.metrics, "rows/s") + [
                f"eval accuracy {_pct(e.get('accuracy_before'))} -> {_pct(e.get('accuracy_after'))}",
                f"the same weights keeping K random patches (the control): "
                f"{_pct(e.get('accuracy_random_before'))} -> {_pct(e.get('accuracy_random_after'))}",
                f"trains {', '.join(stage.get('train', []))}; {e.get('trainable_params') or 0:,} trainable parameters"]
            out.append(s)
        return out

    def spec_lines(self, spec: dict) -> list[str]:
        if not is_arrcoc(spec):
            return [f"stage {S.stage_line(spec, i)}" for i in range(len(spec.get("stages") or []))]
        return [f"stage {st['name']}: trains {', '.join(st.get('train', []))}, {st.get('steps')} steps"
                for st in spec.get("stages") or []]

    def planned_memory(self, manifest: dict, profile: Optional[str]) -> dict:
        est = self.recorded_estimate(manifest, profile)
        return {e["stage"]: e["memory"]["total"] for e in est["stages"]} if est else {}

    def report_blocks(self, run_dir: Path, manifest: dict, out: Path) -> list:
        """A finetune pipeline's table: every stage's eval split, at the start and after each stage."""
        if is_arrcoc(manifest.get("spec") or {}):
            return []
        return S.splits_table(run_dir, manifest)


register_kind(Pipeline())
