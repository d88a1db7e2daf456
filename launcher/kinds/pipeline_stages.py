"""`kind: pipeline` of finetune stages (any model the finetune kind runs): each stage planned,
checked and estimated as the finetune it is, and the summary, report sections and splits table of
such a run. The kind (launcher/kinds/pipeline.py) dispatches here for non-ARR-COC models."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from launcher import stages as chain
from launcher.errors import LauncherError
from launcher.kinds.finetune import FINETUNE


def stage_line(spec: dict, i: int) -> str:
    """`domain: lora on causal_lm, 40 steps, from hf:models/q, merged after`."""
    stage, ft = spec["stages"][i], chain.stage_spec(spec, i)
    return (f"{stage['name']}: {stage['strategy']['type']} on {(ft.get('data') or {}).get('task')}, "
            f"{(stage.get('train') or {}).get('max_steps')} steps, from {chain.starts_from(spec, i)}"
            f"{', merged after' if stage.get('merge') else ''}")


def check_stages(spec: dict, target: str) -> tuple[dict, list[str]]:
    """Each stage's data checked as its finetune's; a stage's `train.max_steps` filled from its rows."""
    found, warnings = {}, []
    for i, stage in enumerate(spec["stages"]):
        ft = chain.stage_spec(spec, i)
        try:
            checked, lines = FINETUNE.check_data(ft, target)
        except LauncherError as exc:  # which stage's data it is
            raise type(exc)(f"stages.{stage['name']}: {exc}") from None
        stage["train"]["max_steps"] = ft["train"]["max_steps"]
        found.update({f"{stage['name']}.{role}": info for role, info in checked.items()})
        warnings += [f"stages.{stage['name']}: {w}" for w in lines]
    return found, warnings


def estimate_stages(spec: dict, profile: Optional[str], strict: bool) -> tuple[Optional[dict], list[str]]:
    """The finetune estimate of each stage (its model: the pipeline's, same shape at every stage);
    the pipeline fits when every stage fits."""
    stages, warnings = [], []
    for i, stage in enumerate(spec["stages"]):
        est, lines = FINETUNE.estimate(chain.stage_spec(spec, i), profile, strict)
        warnings += [f"stages.{stage['name']}: {w}" for w in lines]
        if est is None:
            return None, warnings
        stages.append({"stage": stage["name"], **est})
    bad = next((e for e in stages if e["fit"]["verdict"] != "fits"), None)
    worst = max(stages, key=lambda e: e["memory"]["total"])
    return {"kind": "pipeline", "model": spec["model"]["source"], "profile": worst["profile"], "stages": stages,
            "fit": {"verdict": bad["fit"]["verdict"] if bad else "fits",
                    "reason": f"stage {bad['stage']}: {bad['fit']['reason']}" if bad else None,
                    "suggestions": bad["fit"]["suggestions"] if bad else [],
                    "stages": [e["fit"]["verdict"] for e in stages]},
            "peak_per_device_bytes": worst["memory"]["total"]}, warnings


def stages_summary(manifest: dict, s: dict) -> str:
    from common.units import metric as _f
    from common.units import pct as _pct

    lines = [f"run            {manifest.get('run_id')}"]
    for name, st in (s.get("stages") or {}).items():
        line = (f"  stage {name:<10} {st.get('strategy')}, {st.get('steps')} steps: loss {_f(st.get('loss_first'))} -> "
                f"{_f(st.get('loss_last'))}, eval loss {_f(st.get('eval_loss_before'))} -> "
                f"{_f(st.get('eval_loss_after'))}")
        if st.get("eval_exact_match_before") is not None:
            line += f", exact match {_pct(st['eval_exact_match_before'])} -> {_pct(st.get('eval_exact_match_after'))}"
        if st.get("eval_accuracy_before") is not None:
            line += f", accuracy {_pct(st['eval_accuracy_before'])} -> {_pct(st.get('eval_accuracy_after'))}"
        lines.append(line)
    lines += [f"wall time      {s.get('wall_time_s')} s",
              f"result         {s.get('result')}",
              f"artifacts      {manifest.get('plan', {}).get('run_dir', '?')} (pipeline.json, stages/)"]
    return "\n".join(lines)


def stage_sections(run_dir: Path, manifest: dict) -> list:
    from launcher.report import finetune_section, read_json

    entries = {e["name"]: e for e in read_json(run_dir / "pipeline.json").get("stages", [])}
    out = []
    for i, stage in enumerate((manifest.get("spec") or {}).get("stages", [])):
        e = entries.get(stage["name"], {})
        s = finetune_section(f"stage {stage['name']}", stage["name"], chain.stage_folder(run_dir, stage["name"]),
                             e.get("summary") or {}, e.get("status", "not started"))
        s.facts.insert(0, f"{stage['strategy']['type']}, from {chain.starts_from(manifest['spec'], i)}"
                          f"{', merged after' if stage.get('merge') else ''}")
        if e.get("error"):
            s.facts.append(f"error: {e['error']}")
        out.append(s)
    return out


def splits_table(run_dir: Path, manifest: dict) -> list:
    """Eval loss on every stage's eval split: at the start and after each stage (jobs/stages.py)."""
    from launcher.report import read_json

    evals = read_json(run_dir / "pipeline.json").get("evals") or []
    splits = list(dict.fromkeys(e["split"] for e in evals))
    if not splits:
        return []
    after = list(dict.fromkeys(e["after"] for e in evals))
    value = {(e["after"], e["split"]): e for e in evals}

    def cell(key):
        e = value.get(key)
        if e is None:
            return "-"
        shares = [f"{100 * e[k]:.1f}%{label}" for k, label in (("accuracy", ""), ("exact_match", " exact"))
                  if e.get(k) is not None]
        kept = " [own adapter]" if e.get("kept_adapter") else ""
        return f"{e['loss']:.3f}" + (f" ({', '.join(shares)})" if shares else "") + kept

    rows = [[a if a == "start" else f"after {a}"] + [cell((a, sp)) for sp in splits] for a in after]
    return [("h2", "Every stage on every eval split"),
            ("p", "Eval loss (accuracy for classification, exact match for chat and instruction) of the pipeline's "
                  "model at the start and after each stage, on the first rows of each stage's eval split (the rows "
                  "its finetune scores). [own adapter]: that split's stage trained an adapter that a later "
                  "new_adapter stage set aside; it answers its own split, as a user routes that task."),
            ("table", ["model"] + [f"{sp} eval" for sp in splits], rows)]
