"""The strategy table: every fine-tuning strategy on the same task, through the launcher.

`python -m bench.strategy_table [--address ADDR] [--steps N]` starts an embedded local head
(unless --address), makes the data, and runs:
  0. a "pretrained" base: tiny-llama fully trained on the old task (alphabet), exported;
  1. each strategy fine-tuning that base (`hf:<export>`) on the new task (counting), all with the
     same data, steps, batch and workers; eval = counting, retain = alphabet (forgetting).
Writes bench/results/strategies.json and strategies.md. Peak memory is the peak RSS
(`ru_maxrss`) of the rank-0 training worker process, and its rise over that process's RSS when
the train loop began (imports done, model not yet built); torch has no CPU allocator peak counter.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

VARIANTS = [
    ("full", {"strategy": {"type": "full"}, "train": {"lr": 1e-3}}),
    ("full, lr_cap 1e-5", {"strategy": {"type": "full"}, "train": {"lr": 1e-3},
                           "mitigation": {"lr_cap": 1e-5}}),
    ("freeze first layer", {"strategy": {"type": "freeze", "freeze_first_layers": 1}, "train": {"lr": 1e-3}}),
    ("freeze backbone, train head", {"strategy": {"type": "freeze", "train": ["lm_head"]}, "train": {"lr": 3e-3}}),
    ("gradual unfreeze", {"strategy": {"type": "gradual_unfreeze", "train": ["lm_head", r"model\.norm"],
                                       "schedule": [{"step": 10, "unfreeze": [r"layers\.1\."]},
                                                    {"step": 25, "unfreeze": [r"layers\.0\.", "embed"]}]},
                          "train": {"lr": 1e-3}}),
    ("full, lr_groups default", {"strategy": {"type": "full"}, "lr_groups": "default"}),
    ("lora r8", {"strategy": {"type": "lora", "r": 8, "alpha": 16}, "train": {"lr": 3e-3}}),
    ("qlora r8 nf4", {"strategy": {"type": "qlora", "r": 8, "alpha": 16}, "train": {"lr": 3e-3}}),
    ("prefix 10", {"strategy": {"type": "prefix", "num_virtual_tokens": 10}, "train": {"lr": 1e-2}}),
    ("prompt 10", {"strategy": {"type": "prompt", "num_virtual_tokens": 10}, "train": {"lr": 1e-2}}),
    ("ia3", {"strategy": {"type": "ia3"}, "train": {"lr": 1e-2}}),
    ("full + replay 20%", {"strategy": {"type": "full"}, "train": {"lr": 1e-3}, "replay": 0.2}),
    ("full + EWC", {"strategy": {"type": "full"}, "train": {"lr": 1e-3},
                    "mitigation": {"ewc": {"lambda": 1000.0, "samples": 64}}}),
]


def _spec(name, data, storage, steps, base_source, variant: dict) -> dict:
    spec = {
        "kind": "finetune", "name": name,
        "model": {"source": base_source, "seq_len": 40},
        "strategy": variant["strategy"],
        "data": {"train": data["train"], "eval": data["eval"], "retain": data["retain"]},
        "train": {"max_steps": steps, "micro_batch": 16, "lr": 1e-3, "report_every": max(1, steps // 2),
                  "eval_batches": 4, **variant.get("train", {})},
        "resources": {"workers": 2, "cpus_per_worker": 0.5},
        "storage": storage,
    }
    for key in ("lr_groups", "mitigation"):
        if key in variant:
            spec[key] = variant[key]
    if variant.get("replay"):
        spec["data"]["replay"] = {"path": data["old"], "fraction": variant["replay"]}
    return spec


def _submit(spec: dict, address: str) -> dict:
    import launcher

    handle = launcher.submit(spec, "ray", address=address)
    status = handle.wait(timeout=1800)
    manifest = handle.manifest()
    if status != "SUCCEEDED":
        raise RuntimeError(f"{spec['name']}: {status}: {manifest.get('error')}")
    return manifest


def run(address: str | None = None, steps: int = 40, rows: int = 2000, out_dir=RESULTS,
        only: list[str] | None = None) -> dict:
    from launcher.jobplan import plan as make_plan
    from launcher.spec import load_spec
    from launcher.synthetic import make, make_demo

    work = Path(tempfile.mkdtemp(prefix="ftl-strategies-"))
    started_head = None
    if address is None:
        os.environ.setdefault("FTLAUNCH_HOME", str(work / "home"))
        from cluster import local

        started_head = local.up(num_cpus=2)
        address = started_head.address
    try:
        data = {k: str(v) for k, v in make_demo(work / "data", rows=rows).items()}
        data["old"] = str(make("alphabet", rows, work / "old", seed=7))
        storage = str(work / "runs")

        # 0. The pretrained base: alphabet learnt by a full fine-tune of the random-init tiny Llama.
        pre = _spec("st-pretrain", {**data, "train": data["old"]}, storage, steps * 2, "tiny-llama",
                    {"strategy": {"type": "full"}, "train": {"lr": 3e-3}})
        pre_run = _submit(pre, address)
        base = f"hf:{pre_run['plan']['run_dir']}/model"

        rows_out = []
        for label, variant in VARIANTS:
            if only and label not in only:
                continue
            name = "st-" + "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-")[:30].strip("-")
            spec = _spec(name, data, storage, steps, base, variant)
            warnings = make_plan(load_spec(spec), "local", preflight=False).warnings
            t0 = time.time()
            try:
                manifest = _submit(spec, address)
            except RuntimeError as exc:  # the table says so, the other strategies still run
                rows_out.append({"variant": label, "strategy": spec["strategy"]["type"], "error": str(exc)[:300]})
                print(f"[strategies] {label}: FAILED {exc}", flush=True)
                continue
            s = manifest["summary"]
            lines = (Path(manifest["plan"]["run_dir"]) / "metrics.jsonl").read_text().splitlines()
            metrics = [json.loads(x) for x in lines]
            rows_out.append({
                "variant": label, "strategy": spec["strategy"]["type"], "lr": spec["train"]["lr"],
                "trainable_params": s["trainable_params"], "total_params": s["total_params"],
                "peak_rss_mb": s["peak_rss_mb"], "rss_start_mb": s["rss_start_mb"],
                "wall_s": round(time.time() - t0, 1), "train_loop_s": round(metrics[-1]["elapsed_s"], 1),
                "eval_loss_before": s["eval_loss_before"], "eval_loss_after": s["eval_loss_after"],
                "retain_loss_before": s["retain_loss_before"], "retain_loss_after": s["retain_loss_after"],
                "retain_loss_delta": s["retain_loss_delta"], "export_bytes": s["export_bytes"],
                "replay_share": s.get("replay_share"), "ewc_penalty_last": s.get("ewc_penalty_last"),
                "lr_groups": s.get("lr_groups"), "unfrozen_at": s.get("unfrozen_at"),
                "plan_warnings": [w for w in warnings if "train.lr" in w],
            })
            print(f"[strategies] {label}: eval {s['eval_loss_before']:.3f} -> {s['eval_loss_after']:.3f}, "
                  f"retain delta {s['retain_loss_delta']:+.3f}", flush=True)
        result = {
            "task": "tiny-llama (2 layers, hidden 64) pretrained on alphabet, fine-tuned on counting",
            "steps": steps, "micro_batch": 16, "workers": 2, "cpus_per_worker": 0.5,
            "pretrain": {"steps": steps * 2, "retain_loss_after": pre_run["summary"]["retain_loss_after"]},
            "memory_measure": "peak RSS (ru_maxrss) of the rank-0 Ray Train worker; rise over its RSS at loop start",
            "rows": rows_out,
        }
    finally:
        if started_head is not None:
            from cluster import local

            local.down()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "strategies.json").write_text(json.dumps(result, indent=1))
    (out / "strategies.md").write_text(table(result))
    return result


def table(result: dict) -> str:
    lines = [
        "<!-- generated by: python -m bench.strategy_table -->",
        f"Task: {result['task']}; {result['steps']} steps, micro-batch {result['micro_batch']}, "
        f"{result['workers']} workers x {result['cpus_per_worker']} CPU. Eval = counting loss; "
        "retain = alphabet loss (the pretrained task): delta > 0 is forgetting. "
        f"Memory: {result['memory_measure']}.",
        "",
        "| strategy | lr | trainable params | peak RSS MiB (rise) | wall s (train loop s) "
        "| eval loss before -> after | retain loss delta | export |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        if r.get("error"):
            lines.append(f"| {r['variant']} | failed: {r['error'][:120]} |||||||")
            continue
        pct = 100 * r["trainable_params"] / r["total_params"]
        note = " (plan warns: lr above cap)" if r["plan_warnings"] else ""
        lines.append(
            f"| {r['variant']}{note} | {r['lr']:g} | {r['trainable_params']:,} ({pct:.2f}%) "
            f"| {r['peak_rss_mb']:.0f} ({r['peak_rss_mb'] - r['rss_start_mb']:+.0f}) "
            f"| {r['wall_s']:.0f} ({r['train_loop_s']:.0f}) "
            f"| {r['eval_loss_before']:.3f} -> {r['eval_loss_after']:.3f} "
            f"| {r['retain_loss_delta']:+.3f} | {r['export_bytes'] / 1024:.0f} KiB |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address", help="a running Ray head (default: start an embedded one)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--only", nargs="*", help="variant labels to run")
    args = p.parse_args()
    print(table(run(args.address, args.steps, args.rows, only=args.only)))
