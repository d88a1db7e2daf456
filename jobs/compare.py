"""`kind: compare`: the same data, steps and evaluation under several strategies, one report.

The story: expand the variants (each a full finetune spec) -> run each in turn as its own finetune
(torch or deepspeed engine) under <run>/variants/<name> -> a markdown table and PNG plots of
loss curves, eval gain, forgetting, speed and trainable parameters.
"""

from __future__ import annotations

import json
import time

from jobs import finetune
from jobs.artifacts import RunDir
from launcher.spec import validate

COLUMNS = [  # (summary key, header, format)
    ("strategy", "strategy", "{}"),
    ("engine", "engine", "{}"),
    ("trainable_params", "trainable", "{:,}"),
    ("loss_first", "loss first", "{:.3f}"),
    ("loss_last", "loss last", "{:.3f}"),
    ("eval_loss_before", "eval before", "{:.3f}"),
    ("eval_loss_after", "eval after", "{:.3f}"),
    ("eval_accuracy_after", "eval accuracy", "{:.3f}"),
    ("eval_exact_match_before", "exact match before", "{:.2f}"),
    ("eval_exact_match_after", "exact match after", "{:.2f}"),
    ("quality_vs_full", "quality % of full", "{:.1f}"),
    ("forgetting", "retain loss change", "{:+.3f}"),
    ("peak_rss_mb", "peak RSS MiB", "{:,.0f}"),
    ("tokens_per_s", "tokens/s", "{:,.0f}"),
    ("wall_time_s", "wall s", "{:.1f}"),
    ("export_bytes", "export bytes", "{:,}"),
]


def run(spec, plan: dict, run_dir: RunDir) -> dict:
    results = {}
    for name, variant in spec.variant_specs().items():
        variant = validate(variant)  # a finetune spec; jobs/deepspeed_finetune.py fills its engine defaults
        sub = RunDir(str(run_dir.path / "variants" / name))
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
            "tokens_per_s": metrics[-1]["tokens"] / max(metrics[-1]["elapsed_s"], 1e-9) if metrics else None,
            "forgetting": _diff(summary.get("retain_loss_after"), summary.get("retain_loss_before")),
            "curve": [(m["step"], m["loss"], m.get("eval_loss")) for m in metrics],
        }
        run_dir.append("variants.jsonl", {"variant": name, **{k: v for k, v in results[name].items()
                                                              if k != "curve"}})
    quality_vs_full(results)
    report = write_report(results, run_dir.path, spec.name)
    return {
        "variants": {n: {k: r.get(k) for k, _, _ in COLUMNS} for n, r in results.items()},
        "report": report,
    }


def quality_vs_full(results: dict) -> None:
    """Each variant's quality as a percentage of the full fine-tuning variant's (if there is one).

    Classification: eval accuracy after training; instruction and chat: exact match after
    training. Language modelling: the eval-loss gain (before - after), since a loss has no natural 100%.
    """
    full = next((r for r in results.values() if r["strategy"].startswith("full")), None)
    if full is None:
        return
    for r in results.values():
        score = next((k for k in ("eval_accuracy_after", "eval_exact_match_after")
                      if full.get(k) and r.get(k) is not None), None)
        if score:
            r["quality_vs_full"] = 100 * r[score] / full[score]
        elif None not in (full.get("eval_loss_before"), full.get("eval_loss_after"),
                          r.get("eval_loss_before"), r.get("eval_loss_after")):
            gain = full["eval_loss_before"] - full["eval_loss_after"]
            if gain > 0:
                r["quality_vs_full"] = 100 * (r["eval_loss_before"] - r["eval_loss_after"]) / gain


def write_report(results: dict, out, title: str) -> str:
    """report.md (a table and the plots) plus loss.png and summary.png; returns the report's name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results.items():
        steps = [c[0] for c in r["curve"]]
        ax[0].plot(steps, [c[1] for c in r["curve"]], marker="o", label=name)
        ax[1].plot(steps, [c[2] for c in r["curve"]], marker="o", label=name)
    for a, label in zip(ax, ("train loss", "eval loss")):
        a.set_xlabel("step")
        a.set_ylabel(label)
        a.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)
    plt.close(fig)

    names = list(results)
    panels = [("eval_loss_after", "eval loss after"), ("eval_accuracy_after", "eval accuracy"),
              ("eval_exact_match_after", "exact match after"),
              ("forgetting", "retain loss change"), ("tokens_per_s", "tokens/s"),
              ("trainable_params", "trainable parameters")]
    # A panel with no value in any variant (no retain set, no accuracy) is left out.
    panels = [(k, label) for k, label in panels if any(r.get(k) is not None for r in results.values())]
    fig, ax = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5))
    for a, (key, label) in zip(ax, panels):
        a.bar(names, [results[n].get(key) or 0 for n in names])
        a.set_title(label)
        a.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(out / "summary.png", dpi=100)
    plt.close(fig)

    # Exact match exists for instruction and chat tasks only: its columns are left out elsewhere.
    columns = [c for c in COLUMNS if not c[0].startswith("eval_exact_match")
               or any(r.get(c[0]) is not None for r in results.values())]
    lines = [f"# {title}: strategies compared", "",
             "Same data, steps, evaluation and seed for every variant. Quality % of full: eval "
             "accuracy (classification), exact match (instruction, chat: greedy answers to the eval "
             "prompts equal to the reference) or eval-loss gain (language modelling) relative to the "
             "full fine-tuning variant. Peak RSS: the rank-0 worker process.", "",
             "| variant | " + " | ".join(h for _, h, _ in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for name, r in results.items():
        cells = [fmt.format(r[k]) if r.get(k) is not None else "-" for k, _, fmt in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "![loss curves](loss.png)", "", "![summary](summary.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    (out / "report.json").write_text(json.dumps(results, indent=1, default=str))
    return "report.md"


def _label(strategy) -> str:
    return strategy.type + (f" r={strategy.r}" if hasattr(strategy, "r") else "")


def _diff(after, before):
    return None if after is None or before is None else after - before
