"""`kind: pipeline` on any model the finetune kind runs: its stages, one after another, each a
finetune run (jobs/finetune.py) that starts from the previous stage's result.

The story: read pipeline.json -> score the starting model on every stage's eval split -> for each
stage not yet SUCCEEDED: its finetune spec on the model the chain gives it (launcher/stages.py:
the previous stage's model/, merged/, or its base plus the adapter trained on) -> finetune.run in
stages/<stage>/ (a rerun of the stage resumes from its last checkpoint) -> hand on (the tokenizer
beside an exported model; `merge: true`: the adapter merged into its base) -> score the stage's
result on every eval split (a split whose stage's adapter was set aside by a `new_adapter` stage:
with that adapter, as a user routes that task) -> record it in pipeline.json. `ftlaunch resume RUN` reruns this with
the same run id: finished stages are skipped, the interrupted one continues from its checkpoint.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import ray

from common.runfolder import PIPELINE as MANIFEST
from common.runfolder import dir_size, read_json, write_json
from jobs import finetune
from jobs.artifacts import RunDir, on_this_node
from launcher import stages as chain
from launcher.spec import validate

SUMMARY_KEYS = ("strategy", "steps", "loss_first", "loss_last", "eval_loss_before", "eval_loss_after",
                "eval_accuracy_before", "eval_accuracy_after", "eval_exact_match_before", "eval_exact_match_after",
                "retain_loss_before", "retain_loss_after", "trainable_params", "total_params")


def run(spec, plan: dict, run_dir: RunDir) -> dict:
    raw = spec.model_dump(mode="json")
    specs, handoffs = chain.chain(raw, run_dir.path), chain.handoffs(raw, run_dir.path)
    routes, splits = chain.routes(raw, run_dir.path), _splits(spec.stages, specs)
    manifest = read_json(run_dir.path / MANIFEST) or {
        "run_id": plan["run_id"], "evals": [],
        "stages": [{"name": s.name, "status": "PENDING"} for s in spec.stages],
    }
    started = time.time()
    if not any(e["after"] == "start" for e in manifest["evals"]):  # the baseline, measured once
        manifest["evals"] += _scored(specs[0], None, handoffs[0], {}, splits, "start")
        _write(run_dir, manifest)
    for i, (stage, ft) in enumerate(zip(spec.stages, specs)):
        entry = manifest["stages"][i]
        if entry["status"] == "SUCCEEDED":
            print(f"[ftlaunch] stage {stage.name}: already SUCCEEDED, skipped", flush=True)
            continue
        entry.update(status="RUNNING", attempts=entry.get("attempts", 0) + 1, started=entry.get("started", time.time()),
                     source=ft["model"]["source"], init_adapter=ft.get("init_adapter"))
        _write(run_dir, manifest)
        print(f"[ftlaunch] stage {i + 1}/{len(specs)} {stage.name}: {stage.strategy.type} on {ft['data']['task']}, "
              f"from {chain.starts_from(raw, i)}", flush=True)
        try:
            if "summary" not in entry:  # trained already when a stop came during its hand-on
                entry["summary"] = _train(ft, plan, run_dir, stage.name)
                _write(run_dir, manifest)
            folder = str(chain.stage_folder(run_dir.path, stage.name))
            scored = _scored(ft, folder if stage.merge else None, handoffs[i + 1], routes[i], splits, stage.name)
            manifest["evals"] = [e for e in manifest["evals"] if e["after"] != stage.name] + scored
        except BaseException as exc:
            stopped = isinstance(exc, (KeyboardInterrupt, SystemExit)) or type(exc).__name__ == "Stopped"
            entry.update(status="STOPPED" if stopped else "FAILED", error=f"{type(exc).__name__}: {exc}")
            _write(run_dir, manifest)
            raise
        entry.update(status="SUCCEEDED", finished=time.time())
        entry.pop("error", None)
        _write(run_dir, manifest)

    done = manifest["stages"]
    source, adapter = handoffs[-1]
    kept = {name: route["adapter"] for name, route in routes[-1].items()}
    if kept:
        adapter = ", ".join(f"{name}: {folder}" for name, folder in {**kept, spec.stages[-1].name: adapter}.items())
    return {
        "wall_time_s": round(time.time() - started, 2),
        "stages": {e["name"]: {k: e["summary"].get(k) for k in SUMMARY_KEYS} for e in done},
        "steps": sum(e["summary"].get("steps") or 0 for e in done),
        "loss_first": done[0]["summary"].get("loss_first"),
        "loss_last": done[-1]["summary"].get("loss_last"),
        "trainable_params": max(e["summary"].get("trainable_params") or 0 for e in done),
        "total_params": done[-1]["summary"].get("total_params"),
        "result": f"{source} + adapter{'s' if kept else ''} {adapter}" if adapter else source,
        "export": "stages",
        "export_bytes": dir_size(run_dir.path / chain.STAGES),
    }


def _train(ft: dict, plan: dict, run_dir: RunDir, name: str) -> dict:
    """One stage as the finetune it is, in its own folder (Ray Train's run is named after it)."""
    sub = RunDir(str(chain.stage_folder(run_dir.path, name)))
    data = {role.split(".", 1)[1]: info for role, info in (plan.get("data") or {}).items()
            if role.startswith(f"{name}.")}
    summary = finetune.run(validate(ft), {"run_id": name, "data": data}, sub)
    # Rank 0 saved them, maybe on another node (a run in object storage): here, they are pulled.
    tokenizer, model = Path(on_this_node(str(sub.path / "tokenizer"))), Path(on_this_node(str(sub.path / "model")))
    if model.is_dir():  # the next stage loads model/ as an hf: folder: its tokenizer goes with it
        shutil.copytree(tokenizer, model, dirs_exist_ok=True)
    return summary


def _splits(stages, specs: list[dict]) -> list[dict]:
    """Each stage's eval split as its finetune scores it (the same rows, task and columns; exact
    match on as many rows as it generates for), named after the first stage that reads it: stages
    that share one are scored on it once."""
    from jobs.generate import GENERATED_TASKS

    found = {}
    for stage, ft in zip(stages, specs):
        data, train = ft["data"], ft.get("train") or {}
        rows = train.get("eval_batches", 4) * 16
        generate = train.get("eval_generate", 0) if data["task"] in GENERATED_TASKS else 0
        if data.get("eval"):
            key = json.dumps([data["eval"], data["task"], data.get("columns"), data.get("chat_template"), rows])
            found.setdefault(key, {"split": stage.name, "data": data, "rows": rows, "generate": generate})
    return list(found.values())


def _scored(ft: dict, merge_folder: str | None, handoff: tuple, routes: dict, splits: list[dict],
            after: str) -> list[dict]:
    """`score` as a Ray task on the resources of one of the stage's workers (the driver holds none)."""
    res = ft.get("resources") or {}
    task = score.options(num_cpus=res.get("cpus_per_worker", 1), num_gpus=res.get("gpus_per_worker", 0))
    return ray.get(task.remote(ft, merge_folder, handoff, routes, splits, after))


@ray.remote
def score(ft: dict, merge_folder: str | None, handoff: tuple, routes: dict, splits: list[dict],
          after: str) -> list[dict]:
    """Merge the stage's adapter into its base when asked (into `<folder>/merged`), then score the
    model the next stage starts from on every stage's eval split, except the splits of stages
    whose adapter was set aside (`routes`): those with that adapter on its base."""
    if merge_folder:  # this node's copy of the stage's folder (its adapter, tokenizer pulled)
        folder = RunDir(merge_folder)
        for part in ("adapter", "tokenizer"):
            on_this_node(str(Path(merge_folder) / part))
        _merge(ft, folder.path)
        folder.sync()  # merged/ into the store, from a node other than the driver's
    handoff = (_here_source(handoff[0]), on_this_node(handoff[1]) if handoff[1] else None)
    routes = {k: {**r, "source": _here_source(r["source"]),
                  "adapter": on_this_node(r["adapter"]) if r.get("adapter") else r.get("adapter")}
              for k, r in routes.items()}
    here = {"source": handoff[0], "adapter": handoff[1], "strategy": ft["strategy"]}
    models = {}
    for split in splits:
        route = routes.get(split["split"], here)
        models.setdefault(json.dumps(route, sort_keys=True), (route, []))[1].append(split)
    out = []
    for route, answered in models.values():
        out += _score_on(ft, route, answered, after)
    for entry in out:
        if entry["split"] in routes:
            entry["kept_adapter"] = True
    return sorted(out, key=lambda e: [s["split"] for s in splits].index(e["split"]))


def _here_source(source: str) -> str:
    return "hf:" + on_this_node(source[len("hf:"):]) if source.startswith("hf:") else source


def _score_on(ft: dict, route: dict, splits: list[dict], after: str) -> list[dict]:
    """Eval loss (accuracy for classification, exact match for generated tasks) of one model: the
    route's base, with its adapter when it has one."""
    import torch

    from jobs import components as C
    from jobs import generate as G
    from jobs import strategies as S
    from launcher.spec import DataSpec, ModelSpec

    adapter, model_spec = route["adapter"], {**ft["model"], "source": route["source"]}
    model = C.build_model(model_spec, seed=(ft.get("train") or {}).get("seed", 0))
    if adapter:
        model = S.reload(adapter, model, route["strategy"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device).eval()
    out = []
    for split in splits:
        rows = C.load_split(split["data"]["eval"], C.data_of({"data": split["data"]}), split["rows"])
        metrics = C.evaluate(model, rows, {"data": split["data"], "model": model_spec})
        if split.get("generate"):
            data = DataSpec.model_validate(split["data"])
            pairs = G.eval_pairs(data.eval, data, split["generate"])
            metrics.update(G.evaluate(model, ModelSpec.model_validate(model_spec), data, pairs))
        out.append({"after": after, "split": split["split"], **metrics})
    return out


def _merge(ft: dict, folder: Path) -> None:
    from jobs import components as C
    from jobs import strategies as S

    base = C.build_model(ft["model"], seed=(ft.get("train") or {}).get("seed", 0))
    merged = S.merge(str(folder / "adapter"), base)
    target = folder / chain.MERGED
    merged.save_pretrained(target)
    shutil.copytree(folder / "tokenizer", target, dirs_exist_ok=True)


def _write(run_dir: RunDir, manifest: dict) -> None:
    write_json(run_dir.path / MANIFEST, manifest)  # atomic: a stop mid-write loses nothing
