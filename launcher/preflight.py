"""Probe before you spend: datasets, parameters, memory and fit, checked before any submit.

`plan()` calls `check()`; everything here reads file footers and model configs only.
"""

from __future__ import annotations

from typing import Optional

from common.catalog import RANDOM_INIT_SOURCES
from launcher.errors import ConfigError, MissingExtraError, PlanError

DATA_ROLES = ("train", "eval", "retain")
PEFT_TYPES = ("lora", "qlora", "prefix", "prompt", "ia3")
# Strategies that update a pretrained model's own weights, and the design's safe rate for them.
FULL_TYPES = ("full", "freeze", "gradual_unfreeze")
PRETRAINED_LR_CAP = 1e-5  # DESIGN: full fine-tuning of a pretrained model at 1e-5 .. 5e-6


def check_data(spec: dict, target: str = "local") -> tuple[dict, list[str]]:
    """Footer-level checks of every dataset in the spec; returns row counts and warnings.

    For a remote target a local path this machine cannot see may live on the cluster (a shared
    volume): it is reported as unchecked instead of refused.
    """
    import os

    from launcher.datacheck import check_dataset, steps_for, sufficiency

    if "tasks" in spec:  # kind: multitask checks each task's datasets and steps
        from launcher import multitask

        return multitask.check_data(spec, target)
    if "stages" in spec:
        return _check_stage_data(spec, target)
    data, train = spec["data"], spec["train"]
    found, warnings = {}, []
    roles = [(r, data.get(r)) for r in DATA_ROLES]
    if data.get("replay"):
        roles.append(("replay", data["replay"]["path"]))
    for role, path in roles:
        if path and target != "local" and "://" not in path and not os.path.exists(path):
            warnings.append(f"data.{role}: {path} is not visible here; not checked before submit")
            continue
        if path:
            info = check_dataset(path, data["task"], role=role, columns=data.get("columns"))
            found[role] = {"rows": info.rows, "files": info.files}
    if "train" not in found:
        if train.get("max_steps") is None:
            raise PlanError("train.max_steps is needed: the train rows cannot be counted from here")
        return found, warnings
    peft = spec.get("strategy", {}).get("type") in PEFT_TYPES
    warnings += sufficiency(data["task"], found["train"]["rows"], peft=peft,
                            force=data.get("force", False))
    if train.get("max_steps") is None:
        workers = spec["resources"]["workers"]
        train["max_steps"] = steps_for(found["train"]["rows"], train["epochs"], train["micro_batch"], workers)
    return found, warnings


def check_model(spec: dict, target: str = "local") -> list[str]:
    """An hf: model is a local folder with config.json: jobs run with the hub offline
    (HF_HUB_OFFLINE=1), so a hub id, or a folder that is not there, would fail on the cluster."""
    import os

    models = [spec.get("model") or {}] + [v.get("model") for v in (spec.get("variants") or {}).values()]
    warnings = []
    for model in models:
        source = model.get("source", "") if isinstance(model, dict) else ""
        if not source.startswith("hf:"):
            continue
        folder = source[3:]
        if os.path.isfile(os.path.join(folder, "config.json")):
            continue
        if target != "local" and not os.path.exists(folder):
            warnings.append(f"model.source: {folder} is not visible here; not checked before submit")
            continue
        raise ConfigError(
            f"model.source: {source} is not a local model folder (no config.json in {folder}); jobs "
            "do not download from the Hugging Face hub (HF_HUB_OFFLINE=1): download the model first "
            "and point hf: at its folder"
        )
    return warnings


def check_fit(spec: dict, profile: Optional[str], strict: bool) -> tuple[Optional[dict], list[str]]:
    """The planner's estimate; refuses a job that cannot fit or cannot be scheduled."""
    if "tasks" in spec:  # kind: multitask estimates each adapter worker and the packed layout
        from launcher import multitask

        return multitask.check_fit(spec, profile, strict)
    from launcher.planner import estimate, estimate_pipeline

    if "stages" in spec:  # a pipeline: one estimate per stage; it fits when every stage fits
        estimate = estimate_pipeline
    try:
        est = estimate(spec, profile)
    except MissingExtraError as exc:
        return None, [f"no parameter or memory estimate: {exc}"]
    verdict = est["fit"]["verdict"]
    if verdict != "fits" and strict:
        # Each fix with the overrides (or --profile) that make it, to paste after the spec.
        fixes = [f"{s['change']}: {s['args']}" for s in est["fit"].get("suggestions", [])]
        fix = f"; would fit: {'; '.join(fixes)}" if fixes else ""
        raise PlanError(f"{verdict} on profile {est['profile']}: {est['fit']['reason']}{fix}")
    warnings = [] if verdict == "fits" else [f"{verdict} on {est['profile']}: {est['fit']['reason']}"]
    return est, warnings


def check_learning_rate(spec: dict) -> list[str]:
    """Warn when a pretrained model's own weights train above the design's 1e-5 cap (the rate
    that `train.lr` gives them: all of them, or those no `lr_groups` entry claims)."""
    strategy, model = spec["strategy"]["type"], spec.get("model", {}).get("source", "tiny-llama")
    if strategy not in FULL_TYPES or model in RANDOM_INIT_SOURCES or spec.get("lr_groups") == "default":
        return []
    lr = spec["train"]["lr"]
    cap = (spec.get("mitigation") or {}).get("lr_cap")
    effective = min(lr, cap) if cap else lr
    if effective <= PRETRAINED_LR_CAP:
        return []
    return [
        f"train.lr {lr:g} is above {PRETRAINED_LR_CAP:g} for {strategy} fine-tuning of the pretrained "
        f"model {model}: catastrophic forgetting is likely (the design's range is 1e-5 to 5e-6); "
        f"lower train.lr or set mitigation.lr_cap: {PRETRAINED_LR_CAP:g}"
    ]
def _check_stage_data(spec: dict, target: str) -> tuple[dict, list[str]]:
    """A pipeline's datasets, stage by stage (a stage without `data:` reads the pipeline's)."""
    import os

    from launcher.datacheck import check_dataset, sufficiency

    found, warnings, seen = {}, [], {}
    # The stages train adapters only (texture adapter, LoRA) unless one trains the LLM or vision.
    peft = not any({"llm", "vision"} & set(s["train"]) for s in spec["stages"])
    for stage in spec["stages"]:
        data = stage.get("data") or spec["data"]
        for role in DATA_ROLES:
            path = data.get(role)
            if not path:
                continue
            key = f"{stage['name']}.{role}"
            if target != "local" and "://" not in path and not os.path.exists(path):
                warnings.append(f"stages.{stage['name']}.data.{role}: {path} is not visible here; not checked")
                continue
            if path not in seen:
                info = check_dataset(path, data["task"], role=role, columns=data.get("columns"))
                seen[path] = {"rows": info.rows, "files": info.files}
                if role == "train":
                    warnings += sufficiency(data["task"], info.rows, peft=peft, force=data.get("force", False))
            found[key] = seen[path]
    return found, warnings
