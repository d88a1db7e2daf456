"""Probe before you spend: the checks every kind's plan shares, before any submit.

A kind's own data checks and estimate live in its launcher/kinds/ file; here are the model-folder
check, the fit verdict, and the learning-rate warning. All read file footers and configs only.
"""

from __future__ import annotations

from typing import Callable, Optional

from common.catalog import RANDOM_INIT_SOURCES
from launcher.errors import ConfigError, MissingExtraError, PlanError
from launcher.strategies import get_strategy

# The design's safe rate for strategies that update a pretrained model's own weights.
PRETRAINED_LR_CAP = 1e-5  # DESIGN: full fine-tuning of a pretrained model at 1e-5 .. 5e-6


def check_model(models: list, target: str = "local", datasets: list = (), written: list = ()) -> list[str]:
    """An hf: model is a local folder with config.json, or a hub id found in the local Hugging Face
    cache (the plan resolved it to its snapshot folder): jobs run with the hub offline
    (HF_HUB_OFFLINE=1), so anything else would fail on the cluster. `written`: the same model blocks
    as the spec wrote them, before paths were resolved. A folder seen here is checked through
    (launcher/modelcheck.py: tokenizer, embeddings, positions, chat template, pad token)."""
    import os

    from common import hfsource
    from launcher.modelcheck import check_folder

    warnings = []
    for i, model in enumerate(models):
        source = model.get("source", "") if isinstance(model, dict) else ""
        if source in RANDOM_INIT_SOURCES:
            check_byte_tokenizer(source, datasets)
        if not source.startswith(hfsource.HF):
            continue
        folder = source[len(hfsource.HF):]
        if os.path.isfile(os.path.join(folder, "config.json")):
            warnings += check_folder(folder, model, datasets)
            continue
        spelt = str((written[i] if i < len(written) else model).get("source", source))[len(hfsource.HF):]
        hub = hfsource.repo_id(spelt) and not os.path.exists(folder)
        if target != "local" and not os.path.exists(folder):
            where = " nor in this machine's Hugging Face cache" if hub else ""
            warnings.append(f"model.source: {folder} is not visible here{where}; not checked before submit")
            continue
        if hub:
            try:
                hfsource.resolve(spelt)
            except hfsource.NotInCache as exc:
                raise ConfigError(str(exc)) from None
        raise ConfigError(
            f"model.source: {source} is not a local model folder (no config.json in {folder}); jobs "
            "do not download from the Hugging Face hub (HF_HUB_OFFLINE=1): download the model first "
            "and point hf: at its folder, or at <org>/<name> in the local Hugging Face cache"
        )
    return warnings


def check_byte_tokenizer(source: str, datasets: list) -> None:
    """The random-init catalogue models tokenize bytes and ship no chat template."""
    from common.chat import CHAT_TEMPLATES
    from launcher.modelcheck import CHAT_TASKS, get_field

    for data in datasets:
        task = get_field(data, "task")
        if task in CHAT_TASKS and not get_field(data, "chat_template"):
            raise ConfigError(f"data.task: {task} on {source} needs a chat template and its byte-level tokenizer "
                              f"has none; set data.chat_template: {' | '.join(CHAT_TEMPLATES)}")


def check_fit(spec: dict, profile: Optional[str], strict: bool) -> tuple[Optional[dict], list[str]]:
    """The planner's estimate of a spec dict, by its kind; refuses a job that cannot fit (strict)."""
    from launcher.kinds import get_kind

    return get_kind(spec["kind"]).estimate(spec, profile, strict)


def judged(estimator: Callable[[], dict], strict: bool) -> tuple[Optional[dict], list[str]]:
    """Run one of the planner's estimators; a job that does not fit or cannot be scheduled is
    refused (strict) or warned about. Without the training extra there is no estimate, only a warning."""
    try:
        est = estimator()
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
    if get_strategy(strategy).is_adapter or model in RANDOM_INIT_SOURCES or spec.get("lr_groups") == "default":
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
