"""`kind: pipeline`: the ARR-COC stages, run one after another by jobs/pipeline.py, each starting
from the previous stage's checkpoint.

Its spec model, what its stages run, their data checks, the per-stage estimate, the worker layout
(the largest stage's), and how plan, the summary and the report show it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from launcher.kinds import Engine, Kind, check_datasets, layout, register_kind, resolve_data, resolve_model
from launcher.spec import (
    MAX_BATCH,
    MAX_STEPS,
    DataSpec,
    JobBase,
    MaxFailures,
    ModelSpec,
    ResourcesSpec,
    Strict,
)
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




class Pipeline(Kind):
    name = "pipeline"
    model = PipelineSpec
    # jobs/pipeline.py reads the columns image, question and answer of train and eval, nothing else.
    engines = {"pipeline": Engine("pipeline", "jobs.pipeline", tasks=("vqa",), sources=("arrcoc-mini",))}
    plan_only = {"arrcoc-7b": "the job builds it from its config with random weights (no pretrained "
                              "ARR-COC weights ship with ftlaunch)"}
    trains = "on an ARR-COC model"
    throughput_unit = "rows/s"

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

    def check_data(self, spec: dict, target: str) -> tuple[dict, list[str]]:
        """The datasets, stage by stage (a stage without `data:` reads the pipeline's)."""
        from launcher.datacheck import sufficiency

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

        def run():
            from launcher.planner import estimate_pipeline

            return estimate_pipeline(spec, profile)

        return judged(run, strict)

    def resources(self, spec: dict, estimate: Optional[dict]) -> dict:
        # Stages run one at a time: the job needs its largest stage's.
        res = max((st["resources"] for st in spec["stages"]),
                  key=lambda r: (r["workers"] * r["gpus_per_worker"], r["workers"] * r["cpus_per_worker"]))
        return layout(res["workers"], res)

    def label(self, spec: dict) -> str:
        return spec["model"]["source"]

    def describe(self, spec: dict, estimate: Optional[dict]) -> list[str]:
        return [f"stage         {s['name']}: trains {'+'.join(s['train'])}, {s['steps']} steps, "
                f"{s['resources']['workers']} x ({s['resources']['cpus_per_worker']} CPU, "
                f"{s['resources']['gpus_per_worker']} GPU)" for s in spec["stages"]]

    def format_estimate(self, estimate: dict) -> str:
        from launcher.planner import format_pipeline_estimate

        return format_pipeline_estimate(estimate)

    def summary(self, manifest: dict, s: dict) -> str:
        from common.units import metric as _f

        stages = s.get("stages") or {}
        lines = [f"run            {manifest.get('run_id')}",
                 f"accuracy       {_f(s.get('accuracy_before'))} -> {_f(s.get('accuracy_after'))} "
                 f"over {len(stages)} stages"]
        for name, st in stages.items():
            lines.append(f"  stage {name:<12} {st.get('steps')} steps, accuracy {_f(st.get('accuracy_before'))} -> "
                         f"{_f(st.get('accuracy_after'))}, loss {_f(st.get('loss_last'))}, "
                         f"{st.get('trainable_params') or 0:,} trainable")
        lines += [f"wall time      {s.get('wall_time_s')} s",
                  f"artifacts      {manifest.get('plan', {}).get('run_dir', '?')} (pipeline.json, stages/)"]
        return "\n".join(lines)

    def sections(self, run_dir: Path, manifest: dict) -> list:
        from common.units import pct as _pct
        from launcher.report import Section, loss_facts, read_json, read_jsonl

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
                f"trains {', '.join(stage.get('train', []))}; {e.get('trainable_params') or 0:,} trainable parameters"]
            out.append(s)
        return out

    def spec_lines(self, spec: dict) -> list[str]:
        return [f"stage {st['name']}: trains {', '.join(st.get('train', []))}, {st.get('steps')} steps"
                for st in spec.get("stages") or []]

    def planned_memory(self, manifest: dict, profile: Optional[str]) -> dict:
        est = self.recorded_estimate(manifest, profile)
        return {e["stage"]: e["memory"]["total"] for e in est["stages"]} if est else {}


register_kind(Pipeline())
