"""A finetune pipeline's stages as finetune specs: each stage's spec, the model it starts from
(the chain), and where in the run folder a stage writes. Pure: the kind plans with it
(launcher/kinds/pipeline.py) and the job runs with it (jobs/stages.py).

A stage starts from the previous stage's result: the whole model it exported (full, partial
strategies: `model/`), the adapter merged into its base (`merge: true`: `merged/`), or its base
with the adapter carried on (`init_adapter`: the next stage trains the same adapter further), or
that base alone (`new_adapter: true`: the stage trains an adapter of its own; the earlier one is
kept, and still answers its own stage's eval split: `routes`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

from common.catalog import RANDOM_INIT_SOURCES
from launcher.strategies import get_strategy

# A stage's own fields that are a finetune spec's fields of the same name.
FINETUNE_FIELDS = ("strategy", "data", "train", "resources", "lr_groups", "mitigation")
# The pipeline's job-wide fields every stage runs under.
JOB_FIELDS = ("storage", "env", "pending_timeout", "keep_checkpoints")
STAGES = "stages"  # <run>/stages/<stage>/: the stage's finetune run folder
MERGED = "merged"  # <run>/stages/<stage>/merged/: its adapter merged into its base (merge: true)


def stage_folder(run_dir: str | Path, stage: str) -> Path:
    return Path(run_dir) / STAGES / stage


def stage_spec(spec: dict, index: int) -> dict:
    """Stage `index` of a pipeline spec dict as a finetune spec dict, on the pipeline's model
    (plan estimates it so; `chain` sets where it really starts from)."""
    stage = spec["stages"][index]
    out = {k: copy.deepcopy(spec[k]) for k in JOB_FIELDS if k in spec}
    out.update({k: copy.deepcopy(stage[k]) for k in FINETUNE_FIELDS if stage.get(k) is not None})
    if "data" not in out and spec.get("data") is not None:
        out["data"] = copy.deepcopy(spec["data"])
    name = f"{spec['name']}-{stage['name']}".replace("_", "-")[:40].strip("-")
    return {**out, "kind": "finetune", "name": name, "model": copy.deepcopy(spec.get("model") or {})}


def carries_adapter(stage: dict) -> bool:
    """Whether the next stage starts from this stage's base plus its adapter (not merged)."""
    return get_strategy(stage["strategy"]).is_adapter and not stage.get("merge")


def handoffs(spec: dict, run_dir: str | Path) -> list[tuple[str, Optional[str]]]:
    """Where each stage starts, `(model source, adapter folder or None)`, and last what the whole
    pipeline ends with (one more than there are stages)."""
    source, adapter = (spec.get("model") or {}).get("source", "tiny-llama"), None
    out = [(source, adapter)]
    for stage in spec["stages"]:
        folder = stage_folder(run_dir, stage["name"])
        registered = get_strategy(stage["strategy"])
        if not registered.is_adapter:
            source, adapter = f"hf:{folder / registered.export}", None
        elif stage.get("merge"):
            source, adapter = f"hf:{folder / MERGED}", None
        else:
            adapter = str(folder / registered.export)  # the base stays the same
        out.append((source, adapter))
    return out


def chain(spec: dict, run_dir: str | Path) -> list[dict]:
    """Every stage's finetune spec dict as it runs: the first on the pipeline's model, each later
    one on what the one before it left in its stage folder (a new adapter: its base alone)."""
    out = []
    for i, (source, adapter) in enumerate(handoffs(spec, run_dir)[:-1]):
        ft = stage_spec(spec, i)
        ft["model"]["source"] = source
        if adapter and not spec["stages"][i].get("new_adapter"):
            ft["init_adapter"] = adapter
        out.append(ft)
    return out


def routes(spec: dict, run_dir: str | Path) -> list[dict[str, dict]]:
    """After each stage, the stages whose eval split an adapter set aside answers, `{stage: {source,
    adapter, strategy}}`: a `new_adapter` stage keeps the adapter before it for the stages that
    trained it. A stage that changes the base (a whole model, a merge) leaves none: the kept
    adapters were trained on the base it replaced."""
    out, kept, trained_it = [], {}, []
    stages = spec["stages"]
    for i, (stage, (source, adapter)) in enumerate(zip(stages, handoffs(spec, run_dir))):
        if not carries_adapter(stage):
            kept, trained_it = {}, []
        elif stage.get("new_adapter"):
            route = {"source": source, "adapter": adapter, "strategy": stages[i - 1]["strategy"]}
            kept = {**kept, **{name: route for name in trained_it}}
            trained_it = [stage["name"]]
        else:
            trained_it.append(stage["name"])
        out.append(dict(kept))
    return out


def chain_problems(spec: dict) -> list[str]:
    """What breaks the chain: an adapter carried on into a stage with another strategy, a merge
    of a stage that trains no adapter."""
    problems, stages = [], spec["stages"]
    for i, stage in enumerate(stages):
        where = f"stages.{i} ({stage['name']})"
        strategy = stage["strategy"]
        if stage.get("merge") and not get_strategy(strategy).is_adapter:
            problems.append(f"{where}.merge: true merges an adapter, but strategy {strategy['type']} exports the "
                            "whole model (the next stage starts from it); remove merge")
        new_on_base = i and carries_adapter(stages[i - 1]) and get_strategy(strategy).is_adapter
        if stage.get("new_adapter") and not new_on_base:
            problems.append(f"{where}.new_adapter: true trains a second adapter on the base of the stage before's, "
                            f"but {_no_adapter_reason(stages, i)}; remove new_adapter")
        if (i and carries_adapter(stages[i - 1]) and not stage.get("new_adapter")
                and strategy != stages[i - 1]["strategy"]):
            prev = stages[i - 1]
            problems.append(f"{where}.strategy: {strategy['type']} differs from stage {prev['name']}'s "
                            f"{prev['strategy']['type']} adapter it starts from; use the same strategy to train "
                            f"that adapter on, set merge: true on stage {prev['name']}, or set new_adapter: true "
                            "to train one of its own")
        if i and carries_adapter(stages[i - 1]) and _seed(spec, i) != _seed(spec, i - 1) and (
                (spec.get("model") or {}).get("source", "tiny-llama") in RANDOM_INIT_SOURCES):
            problems.append(f"{where}.train.seed: {_seed(spec, i)} builds another random-init base than the one "
                            f"stage {stages[i - 1]['name']}'s adapter was trained on (seed {_seed(spec, i - 1)}); "
                            "use the same seed, or set merge: true on that stage")
    return problems


def _no_adapter_reason(stages: list[dict], i: int) -> str:
    if not get_strategy(stages[i]["strategy"]).is_adapter:
        return f"its strategy {stages[i]['strategy']['type']} trains no adapter"
    if i == 0:
        return "it is the first stage"
    prev = stages[i - 1]
    if prev.get("merge"):
        return f"stage {prev['name']} merges its adapter (this stage's adapter is new already)"
    return (f"stage {prev['name']}'s {prev['strategy']['type']} trains the whole model "
            "(this stage's adapter is new already)")


def _seed(spec: dict, index: int) -> int:
    return (spec["stages"][index].get("train") or {}).get("seed", 0)


def starts_from(spec: dict, index: int) -> str:
    """How plan describes where a stage starts."""
    if index == 0:
        return (spec.get("model") or {}).get("source", "tiny-llama")
    prev = spec["stages"][index - 1]
    if carries_adapter(prev) and spec["stages"][index].get("new_adapter"):
        return f"the base of {prev['name']}'s adapter, with a new adapter ({prev['name']}'s is kept)"
    if carries_adapter(prev):
        return f"{prev['name']}'s adapter on the base"
    return f"{prev['name']}'s {'merged model' if prev.get('merge') else 'model'}"
