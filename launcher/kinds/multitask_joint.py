"""`kind: multitask` in `mode: joint`: one shared backbone, one classification head per task,
one Ray Train worker (jobs/joint.py). What a joint spec needs and refuses, its data checks and
steps, its estimate (the backbone plus every head), and how plan and the summary show it; the
kind itself (launcher/kinds/multitask.py) dispatches here on `mode`."""

from __future__ import annotations

from typing import Optional

from launcher.errors import MissingExtraError, PlanError
from launcher.kinds import check_datasets

DATA_ROLES = ("train", "eval")
JOINT_DATA = ("classification",)  # tasks a head of the joint backbone learns
JOINT_STRATEGIES = ("full", "freeze", "lora")  # what the joint backbone trains by (the heads always train)


def joint_problems(spec) -> list[str]:
    """What a joint run needs and refuses, one line each: every task a classification head with
    its classes and its weight, no per-adapter overrides, no packing."""
    found = []
    if spec.packing is not False:
        found.append("packing packs adapters (mode: adapters); remove it in mode: joint")
    for t in spec.tasks:
        if t.data.task not in JOINT_DATA:
            found.append(f"tasks.{t.name}: data.task {t.data.task} is not run in mode: joint, which trains one "
                         "classification head per task on a shared backbone; use classification, or mode: "
                         "adapters for causal-LM tasks")
        if t.weight is None:
            found.append(f"tasks.{t.name}.weight is needed in mode: joint: its share of the mixed stream (e.g. 1)")
        if t.num_labels is None and t.data.task in JOINT_DATA:
            found.append(f"tasks.{t.name}.num_labels is needed in mode: joint: its head's classes (e.g. 4)")
        overrides = [f for f in ("lora", "train") if getattr(t, f).model_dump(exclude_none=True)]
        if overrides:
            found.append(f"tasks.{t.name}.{'/'.join(overrides)}: per-task overrides train one adapter each; "
                         "mode: joint is one run: set them in strategy: and train:")
    return found




def joint_shares(spec: dict) -> dict:
    """Each task's share of the mixed stream's steps (its weight over all weights)."""
    total = sum(t["weight"] for t in spec["tasks"])
    return {t["name"]: t["weight"] / total for t in spec["tasks"]}


def check_joint_data(spec: dict, target: str) -> tuple[dict, list[str]]:
    """Footer checks of every task's datasets; `train.max_steps`, when unset, is `train.epochs`
    passes over all tasks' train rows together (a task the mix asks more often cycles its rows)."""
    from launcher.datacheck import steps_for, sufficiency

    entries = [(f"tasks.{t['name']}.", role, t["data"].get(role), t["data"])
               for t in spec["tasks"] for role in DATA_ROLES]
    checked, warnings = check_datasets(entries, target)
    found = {f"{prefix[len('tasks.'):-1]}.{role}": info for (prefix, role), info in checked.items()}
    rows = [found.get(f"{t['name']}.train", {}).get("rows") for t in spec["tasks"]]
    for task, n in zip(spec["tasks"], rows):
        if n is not None:
            warnings += [f"tasks.{task['name']}: {w}" for w in sufficiency(
                task["data"]["task"], n, peft=False, force=task["data"].get("force", False))]
    train = spec["train"]
    if train.get("max_steps") is None:
        if None in rows:
            raise PlanError("train.max_steps is needed: some tasks' train rows cannot be counted from here")
        train["max_steps"] = steps_for(sum(rows), train["epochs"], train["micro_batch"], 1)
    return found, warnings


def _backbone_spec(spec: dict) -> dict:
    """The finetune-shaped spec of the shared backbone alone (no head), for the estimator."""
    res = spec["resources"]
    return {"kind": "finetune", "model": {**spec["model"], "num_labels": None}, "strategy": spec["strategy"],
            "train": spec["train"], "resources": {"workers": 1, "cpus_per_worker": res["cpus_per_worker"],
                                                   "gpus_per_worker": res["gpus_per_worker"]}}


def check_joint_fit(spec: dict, profile: Optional[str], strict: bool) -> tuple[Optional[dict], list[str]]:
    """The backbone's estimate (its strategy's counts), plus every head: a linear layer of
    hidden x labels + labels, trained in full; memory re-measured with them; one worker's fit."""
    try:
        from launcher.planner import estimate, fit, memory_per_gpu
        from launcher.planner.counts import count_parameters
        from launcher.planner.fit import STAGE_LEVERS
    except MissingExtraError as exc:
        return None, [f"no parameter or memory estimate: {exc}"]
    backbone = _backbone_spec(spec)
    try:
        est = estimate(backbone, profile)
        counts = count_parameters(backbone["model"], backbone["strategy"])
    except MissingExtraError as exc:
        return None, [f"no parameter or memory estimate: {exc}"]
    dims = est["parameters"]["dims"]
    if dims.get("causal_lm", True):
        raise PlanError(f"model.source: {spec['model']['source']} is a causal LM; mode: joint puts classification "
                        "heads on an encoder backbone: use minilm or an hf:<folder> of a BERT-type encoder")
    hidden = dims["hidden_size"]
    heads = {t["name"]: hidden * t["num_labels"] + t["num_labels"] for t in spec["tasks"]}
    extra = sum(heads.values())
    for c in (counts, est["parameters"]):
        c.update(total=c["total"] + extra, trainable=c["trainable"] + extra, base_total=c["base_total"] + extra)
        c["percent_trainable"] = round(100.0 * c["trainable"] / c["base_total"], 4)
        c["percent_of_all"] = round(100.0 * c["trainable"] / c["total"], 4)
        c["dims"] = {**c["dims"], "num_labels": max(t["num_labels"] for t in spec["tasks"])}
    settings = est["memory_settings"]
    memory = memory_per_gpu(counts, None, settings["strategy_type"], workers=1, micro_batch=settings["micro_batch"],
                            seq_len=settings["seq_len"], precision=settings["precision"], on_gpu=settings["on_gpu"])
    verdict = fit(memory, est["profile"], est["resources"], STAGE_LEVERS)
    if verdict["verdict"] != "fits":
        message = f"the joint run: {verdict['verdict']} on profile {verdict['profile']}: {verdict['reason']}"
        if strict:
            raise PlanError(message)
        return est, [message]
    est.update(memory={k: v for k, v in memory.items() if k != "inputs"}, fit=verdict)
    est["parameters"]["heads"] = heads
    est["joint"] = {"heads": heads, "shares": joint_shares(spec)}
    return est, []


def describe_joint(spec: dict, estimate: Optional[dict]) -> list[str]:
    steps, shares = spec["train"].get("max_steps"), joint_shares(spec)
    lines = [f"task          {t['name']}: {t['data']['task']}, {t['num_labels']} labels, weight {t['weight']:g} "
             f"({shares[t['name']]:.0%} of the {steps} steps)" for t in spec["tasks"]]
    res = spec["resources"]
    lines.append(f"layout        one Ray Train worker ({res['cpus_per_worker']:g} CPU, {res['gpus_per_worker']:g} GPU; "
                 f"+ {res.get('data_cpus_per_worker', 0.2):g} CPU per task stream): a shared backbone "
                 f"({spec['strategy']['type']}) and {len(spec['tasks'])} heads")
    return lines


def summary_joint(manifest: dict, s: dict) -> str:
    from common.units import metric as _f
    from common.units import pct as _pct
    from common.units import size as _size

    lines = [f"run            {manifest.get('run_id')}",
             f"layout         joint: one {s.get('strategy')} backbone, one head per task, {s.get('steps')} steps"]
    for name, t in (s.get("tasks") or {}).items():
        lines.append(f"  task {name:<14} {t.get('batches')} batches ({_pct(t.get('share'))} of the steps), "
                     f"eval accuracy {_pct(t.get('eval_accuracy_before'))} -> {_pct(t.get('eval_accuracy_after'))}, "
                     f"eval loss {_f(t.get('eval_loss_before'))} -> {_f(t.get('eval_loss_after'))}")
    lines += [f"parameters     {s.get('trainable_params') or 0:,} trainable / {s.get('total_params') or 0:,} total",
              f"export         {_size(s.get('export_bytes'))}: {s.get('export')}/ (backbone/, heads/, heads.json); "
              "launcher.inference.JointModel",
              f"wall time      {s.get('wall_time_s')} s",
              f"artifacts      {manifest.get('plan', {}).get('run_dir', '?')}"]
    return "\n".join(lines)
