"""`kind: finetune`: one model, one strategy, one dataset, trained by Ray Train workers.

Its spec model, its two engines (torch: jobs/finetune.py, deepspeed: jobs/deepspeed_finetune.py)
and what each runs, its data checks and estimate, and how plan, the summary and the report show it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import ConfigDict, Field, model_validator

from launcher.dsconfig import ENGINE_STRATEGIES
from launcher.kinds import Engine, Kind, check_datasets, layout, register_kind, resolve_data, resolve_model
from launcher.spec import (
    DataSpec,
    JobBase,
    ModelSpec,
    PathStr,
    Patterns,
    ResourcesSpec,
    Strict,
    TrainSpec,
)
from launcher.strategies import get_strategy, spec_union

DATA_ROLES = ("train", "eval", "retain")

ENGINES = {
    "torch": Engine("torch", "jobs.finetune", tasks=("causal_lm", "instruction", "chat", "classification"),
                    sources=("tiny-llama", "minilm", "hf:"), elastic=True),
    # The DeepSpeed job streams a causal LM's text tasks (jobs/text.py): no classifier head, no
    # replay mix, no parameter groups, no forgetting penalty.
    "deepspeed": Engine("deepspeed", "jobs.deepspeed_finetune", tasks=("causal_lm", "instruction", "chat"),
                        sources=("tiny-llama", "hf:"), strategies=ENGINE_STRATEGIES,
                        ignores=("data.replay", "lr_groups", "mitigation.ewc", "mitigation.lr_cap", "init_adapter")),
}
PLAN_ONLY = {"llama-2-7b": "planned from its config only; the job loads no weights for it: "
                           "to run it, point model.source at hf:<folder with the weights> on the cluster"}


# Settings every engine shares, once in `train:`; the `deepspeed:` block had its own before.
MOVED_TO_TRAIN = {"precision": "train.precision", "grad_accumulation": "train.grad_accumulation",
                  "activation_checkpointing": "train.grad_checkpointing"}


class DeepSpeedSpec(Strict):
    """The `deepspeed:` block of `engine: deepspeed` (field names shared with the planner); its
    precision, accumulation and checkpointing are the `train:` block's, as for the torch engine."""

    zero_stage: Literal[0, 1, 2, 3] = 0
    offload_optimizer: bool = Field(False, description="optimizer states in CPU memory (ZeRO 1-3)")
    offload_params: bool = Field(False, description="parameters in CPU memory (ZeRO-3 only)")

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, value):
        if isinstance(value, dict):
            moved = [f"deepspeed.{k} is now {new}: move it there" for k, new in MOVED_TO_TRAIN.items() if k in value]
            if moved:
                raise ValueError("; ".join(moved))
        return value


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
    engine: Literal[tuple(ENGINES)] = "torch"
    deepspeed: Optional[DeepSpeedSpec] = None
    data: DataSpec
    train: TrainSpec = Field(default_factory=TrainSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    lr_groups: Optional[Union[Literal["default"], list[LrGroup]]] = Field(
        None, description="per-group learning rates; 'default': new 1e-3, pretrained 2e-5, early 1e-5"
    )
    mitigation: MitigationSpec = Field(default_factory=MitigationSpec)
    init_adapter: Optional[PathStr] = Field(
        None, description="an exported adapter folder (adapter/) the strategy's adapter starts from instead of "
        "fresh weights: a pipeline stage carries its adapter on this way")

    @model_validator(mode="after")
    def _consistent(self):
        problems = []
        if self.init_adapter and not get_strategy(self.strategy).is_adapter:
            problems.append(f"init_adapter: {self.init_adapter} starts an adapter, but strategy {self.strategy.type} "
                            "trains none; use an adapter strategy (lora, ...) or remove init_adapter")
        if self.data.task == "classification" and not self.model.num_labels:
            problems.append("data.task classification needs model.num_labels (e.g. 4)")
        if self.mitigation.ewc and not self.data.retain:
            problems.append("mitigation.ewc needs data.retain: the Fisher information comes from it")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class Finetune(Kind):
    name = "finetune"
    model = FinetuneSpec
    engines = ENGINES
    plan_only = PLAN_ONLY

    def resolve_paths(self, spec: dict, resolve) -> None:
        resolve_data(spec["data"], resolve)
        resolve_model(spec["model"], resolve)
        if spec.get("init_adapter"):
            spec["init_adapter"] = resolve(spec["init_adapter"])

    def prepare(self, spec: dict) -> tuple[Optional[dict], list[str]]:
        from launcher.dsconfig import prepare
        from launcher.preflight import check_learning_rate

        return prepare(spec), check_learning_rate(spec)

    def check_data(self, spec: dict, target: str) -> tuple[dict, list[str]]:
        """Footer checks of every dataset; fills `train.max_steps` from the rows when unset."""
        from launcher.datacheck import steps_for, sufficiency
        from launcher.errors import PlanError

        data, train = spec["data"], spec["train"]
        roles = [(r, data.get(r)) for r in DATA_ROLES] + [("replay", (data.get("replay") or {}).get("path"))]
        checked, warnings = check_datasets([("", role, path, data) for role, path in roles], target)
        found = {role: info for (_, role), info in checked.items()}
        if "train" not in found:
            if train.get("max_steps") is None:
                raise PlanError("train.max_steps is needed: the train rows cannot be counted from here")
            return found, warnings
        peft = get_strategy(spec["strategy"]).is_adapter
        warnings += sufficiency(data["task"], found["train"]["rows"], peft=peft, force=data.get("force", False))
        if train.get("max_steps") is None:
            workers = spec["resources"]["workers"]
            train["max_steps"] = steps_for(found["train"]["rows"], train["epochs"], train["micro_batch"], workers)
        if data.get("packing") or data["task"] in ("instruction", "chat"):
            from launcher import padding  # token lengths of a sample of the train rows: < 0.1 s

            lengths, lines = padding.estimate(spec)
            warnings += lines
            if lengths and data.get("packing"):  # what packing saves
                found["train"] = {**found["train"], "packing": {**lengths, "seq_len": spec["model"]["seq_len"]}}
        return found, warnings

    def data_lines(self, data: dict) -> list[str]:
        from launcher.padding import describe

        packing = (data.get("train") or {}).get("packing")
        return super().data_lines(data) + ([describe(packing, packing["seq_len"])] if packing else [])

    def estimate(self, spec: dict, profile: Optional[str], strict: bool):
        from launcher.preflight import judged

        def run():
            from launcher.planner import estimate

            return estimate(spec, profile)

        return judged(run, strict)

    def without_preflight(self, spec: dict) -> list[str]:
        from launcher.errors import PlanError

        if spec["train"].get("max_steps") is None:
            raise PlanError("train.max_steps is not set and preflight is off: set it, or allow preflight")
        return []

    def resources(self, spec: dict, estimate: Optional[dict]) -> dict:
        return layout(spec["resources"]["workers"], spec["resources"])

    def format_estimate(self, estimate: dict) -> str:
        from launcher.planner import format_estimate

        return format_estimate(estimate)

    def summary(self, manifest: dict, s: dict) -> str:
        from common.units import metric as _f
        from common.units import pct as _pct
        from common.units import size as _size

        trainable, total = s.get("trainable_params") or 0, s.get("total_params") or 0
        pct = f" ({100 * trainable / total:.2f}%)" if total else ""
        lines = [
            f"run            {manifest.get('run_id')}",
            f"loss           {_f(s.get('loss_first'))} -> {_f(s.get('loss_last'))} over {s.get('steps')} steps",
            f"eval loss      {_f(s.get('eval_loss_before'))} -> {_f(s.get('eval_loss_after'))}",
        ]
        if s.get("eval_accuracy_before") is not None:
            lines.append(f"eval accuracy  {_pct(s['eval_accuracy_before'])} -> {_pct(s.get('eval_accuracy_after'))}")
        if s.get("eval_exact_match_before") is not None:
            lines.append(f"exact match    {_pct(s['eval_exact_match_before'])} -> "
                         f"{_pct(s.get('eval_exact_match_after'))} (greedy answers to the eval prompts)")
        if s.get("retain_loss_before") is not None:
            delta = s["retain_loss_after"] - s["retain_loss_before"]
            lines.append(f"retain loss    {_f(s['retain_loss_before'])} -> {_f(s['retain_loss_after'])}"
                         f" (forgetting {delta:+.4f})")
        if s.get("retain_accuracy_before") is not None:
            delta = s["retain_accuracy_after"] - s["retain_accuracy_before"]
            lines.append(f"retain acc.    {_pct(s['retain_accuracy_before'])} -> {_pct(s['retain_accuracy_after'])}"
                         f" ({100 * delta:+.1f} points)")
        if s.get("strategy"):
            groups = ", ".join(f"{g['name']} {g['lr']:g}" for g in s.get("lr_groups") or [])
            lines.append(f"strategy       {s['strategy']}" + (f"; lr groups: {groups}" if groups else ""))
        if s.get("unfrozen_at"):
            lines.append("unfrozen       " + ", ".join(f"{n} params at step {k}" for k, n in s["unfrozen_at"].items()))
        if s.get("padding_fraction") is not None:
            packed = "packed" if (manifest.get("spec") or {}).get("data", {}).get("packing") else "not packed"
            lines.append(f"padding        {_pct(s['padding_fraction'])} of the tokens trained ({packed})")
        if s.get("peak_rss_mb") is not None:
            lines.append(f"peak memory    {s['peak_rss_mb']:.0f} MiB RSS per worker "
                         f"({s['peak_rss_mb'] - s['rss_start_mb']:+.0f} MiB over its start)")
        lines += [
            f"parameters     {trainable:,} trainable / {total:,} total{pct}",
            f"{s.get('export', 'export'):<15}{_size(s.get('export_bytes'))}",
            f"wall time      {s.get('wall_time_s')} s",
            f"artifacts      {manifest.get('plan', {}).get('run_dir', '?')}",
        ]
        return "\n".join(lines)

    def sections(self, run_dir: Path, manifest: dict) -> list:
        from launcher.report import finetune_section

        return [finetune_section("train", "train", run_dir, manifest.get("summary") or {}, manifest.get("status"))]

    def planned_memory(self, manifest: dict, profile: Optional[str]) -> dict:
        est = self.recorded_estimate(manifest, profile)
        return {"train": est["memory"]["total"]} if est else {}


FINETUNE = register_kind(Finetune())
