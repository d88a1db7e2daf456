"""`kind: compare`: the same data, steps and evaluation under several strategies, one report.

The story: expand the variants (each a full finetune spec) -> run each in turn as its own finetune
(torch or deepspeed engine) under <run>/variants/<name> -> one record per variant in
variants.jsonl and the summary; the run's report (report/: the comparison table, its figures,
each variant's curves) is drawn from them by launcher/report.py.
"""

from __future__ import annotations

import time

from common.runfolder import median_throughput
from jobs import finetune
from jobs.artifacts import RunDir
from launcher.kinds.compare import COLUMNS, quality_vs_full
from launcher.spec import validate


def run(spec, plan: dict, run_dir: RunDir) -> dict:
    results = {}
    for name, variant in spec.variant_specs().items():
        variant = validate(variant)  # a finetune spec; jobs/deepspeed_finetune.py fills its engine defaults
        sub = RunDir(str(run_dir.path / "variants" / name), label=f"variant {name}")
        started = time.time()
        # Ray Train's run folder is <storage>/<name>: the variant's own folder.
        summary = finetune.run(variant, {"run_id": name}, sub)
        metrics = sub.read_jsonl("metrics.jsonl")
        zero = f" ZeRO-{summary['deepspeed']['zero_stage']}" if variant.engine == "deepspeed" else ""
        results[name] = {
            **summary,
            "strategy": _label(variant.strategy),
            "engine": variant.engine + zero,
            "wall_time_s": round(time.time() - started, 2),
            "tokens_per_s": median_throughput(metrics),  # the report's definition
            "forgetting": _diff(summary.get("retain_loss_after"), summary.get("retain_loss_before")),
        }
        run_dir.append("variants.jsonl", {"variant": name, **results[name]})
    quality_vs_full(results)
    # The table and figures are the report's (launcher/kinds/compare.py), written by jobs/run.py
    # once the manifest holds this summary.
    return {
        "variants": {n: {k: r.get(k) for k, _, _ in COLUMNS} for n, r in results.items()},
        "report": "report/report.md",
    }


def _label(strategy) -> str:
    return strategy.type + (f" r={strategy.r}" if hasattr(strategy, "r") else "")


def _diff(after, before):
    return None if after is None or before is None else after - before
