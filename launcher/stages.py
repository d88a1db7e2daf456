"""A finetune pipeline's stages as finetune specs: each stage's spec, the model it starts from
(the chain), and where in the run folder a stage writes. Pure: the kind plans with it
(launcher/kinds/pipeline.py) and the job runs with it (jobs/stages.py).

A stage starts from the previous stage's result: the whole model it exported (full, partial
strategies: `model/`), the adapter merged into its base (`merge: true`: `merged/`), or its base
with the adapter carried on (`init_adapter`: the next stage trains the same adapter further).
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
    one on what the one before it left in its stage folder."""
    out = []
    for i, (source, adapter) in enumerate(handoffs(spec, run_dir)[:-1]):
        ft = stage_spec(spec, i)
        ft["model"]["source"] = source
        if adapter:
            ft["init_adapter"] = adapter
        out.append(ft)
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
        if i and carries_adapter(stages[i - 1]) and strategy != stages[i - 1]["strategy"]:
            prev = stages[i - 1]
            problems.append(f"{where}.strategy: {strategy['type']} differs from stage {prev['name']}'s "
                            f"{prev['strategy']['type']} adapter it starts from; use the same strategy to train "
                            f"that adapter on, or set merge: true on stage {prev['name']}")
        if i and carries_adapter(stages[i - 1]) and _seed(spec, i) != _seed(spec, i - 1) and (
                (spec.get("model") or {}).get("source", "tiny-llama") in RANDOM_INIT_SOURCES):
            problems.append(f"{where}.train.seed: {_seed(spec, i)} builds another random-init base than the one "
                            f"stage {stages[i - 1]['name']}'s adapter was trained on (seed {_seed(spec, i - 1)}); "
                            "use the same seed, or set merge: true on that stage")
    return problems


def _seed(spec: dict, index: int) -> int:
    return (spec["stages"][index].get("train") or {}).get("seed", 0)


def starts_from(spec: dict, index: int) -> str:
    """How plan describes where a stage starts."""
    if index == 0:
        return (spec.get("model") or {}).get("source", "tiny-llama")
    prev = spec["stages"][index - 1]
    if carries_adapter(prev):
        return f"{prev['name']}'s adapter on the base"
    return f"{prev['name']}'s {'merged model' if prev.get('merge') else 'model'}"
