"""The report's PNGs (matplotlib, Agg): a section's loss, eval and throughput curves, and memory.

Each function returns the file it wrote, or None when the section recorded nothing to draw, so
the report shows no empty panel. matplotlib is imported inside: the client stays light.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

SIZE, DPI = (7.5, 3.8), 100


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _file(out: Path, what: str, section) -> Path:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", section.name).strip("-") or "run"
    return out / f"{what}-{slug}.png"


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def loss(section, out: Path) -> Optional[Path]:
    """Train loss per record and the eval loss (its before-training point at step 0) vs step."""
    train = [(m["step"], m["loss"]) for m in section.metrics if m.get("loss") is not None]
    evals = section.evals.get("eval loss", [])
    if not train and not evals:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=SIZE)
    if train:
        ax.plot(*zip(*train), marker="o", label="train loss (mean since last record)")
    if evals:  # before and after only: dotted, it is no curve
        ax.plot(*zip(*evals), marker="s", linestyle="--" if len(evals) > 2 else ":", label=_label("eval loss", evals))
    ax.set(xlabel="step", ylabel="loss", title=f"{section.title}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, _file(out, "loss", section), plt)


def evals(section, out: Path) -> Optional[Path]:
    """Eval and retain curves: one panel each for losses, accuracies and exact match (a panel
    without data is left out).

    None when the eval loss alone was recorded: the loss figure already shows it.
    """
    panels = [(kind, {k: v for k, v in section.evals.items() if k.endswith(kind)})
              for kind in ("loss", "accuracy", "exact match")]
    panels = [(kind, series) for kind, series in panels if series]
    if not panels or list(section.evals) == ["eval loss"]:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(SIZE[0], SIZE[1]), squeeze=False)
    last = max(step for _, series in panels for points in series.values() for step, _ in points)
    for ax, (kind, series) in zip(axes[0], panels):
        for label, points in series.items():
            ax.plot(*zip(*points), marker="o", linestyle="-" if len(points) > 2 else ":", label=_label(label, points))
        sets = " and ".join(dict.fromkeys(label.split()[0] for label in series))
        ax.set(xlabel="step (0 = before training)", ylabel=kind, title=f"{sets} {kind}")
        ax.set_xlim(-0.05 * last - 0.5, 1.05 * last + 0.5)
        if kind != "loss":
            ax.set_ylim(-0.02, 1.12)  # room above 1.0 for the legend: accuracy often ends there
        ax.grid(alpha=0.3)
        ax.legend(loc="best" if kind == "loss" else "lower right")
    fig.suptitle(f"{section.title}: evaluation")
    return _save(fig, _file(out, "eval", section), plt)


def throughput(section, out: Path, unit: str = "tokens/s") -> Optional[Path]:
    """The rate each record measured over its window, vs step."""
    points = [(m["step"], m["tokens_per_s"]) for m in section.metrics if m.get("tokens_per_s") is not None]
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=SIZE)
    ax.plot(*zip(*points), marker="o")
    ax.set(xlabel="step", ylabel=unit, title=f"{section.title}: throughput ({unit} since the last record)")
    ax.set_ylim(0, 1.1 * max(v for _, v in points))
    ax.grid(alpha=0.3)
    return _save(fig, _file(out, "throughput", section), plt)


def memory(sections: list, out: Path) -> Optional[Path]:
    """Per section: the planned bytes per worker beside the measured peak RSS and its rise, in MiB."""
    if not any(s.planned is not None or s.measured for s in sections):
        return None
    mib = 1024 * 1024
    bars = [("planned (estimate)", [s.planned / mib if s.planned is not None else None for s in sections]),
            ("measured peak RSS", [s.measured.get("peak_rss_mb") for s in sections]),
            ("measured rise over start", [s.measured["peak_rss_mb"] - s.measured["rss_start_mb"]
                                          if s.measured else None for s in sections])]
    bars = [(label, values) for label, values in bars if any(v is not None for v in values)]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(min(14, 4.5 + 1.2 * len(sections) * len(bars)), SIZE[1]))
    width = 0.8 / len(bars)
    for i, (label, values) in enumerate(bars):
        xs = [j + (i - (len(bars) - 1) / 2) * width for j in range(len(sections))]
        drawn = ax.bar(xs, [v or 0 for v in values], width, label=label)
        ax.bar_label(drawn, labels=["n/a" if v is None else f"{v:,.1f}" for v in values], fontsize=8)
    ax.set_xticks(range(len(sections)), [s.name for s in sections])
    missing = ("" if len(bars) > 1 else " (measured: not recorded)" if bars[0][0].startswith("planned")
               else " (planned: no estimate)")
    ax.set(ylabel="MiB per worker", title=f"memory per worker: planned vs measured{missing}")
    ax.margins(y=0.15)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
    return _save(fig, out / "memory.png", plt)


def _label(name: str, points: list) -> str:
    return name if len(points) > 2 else f"{name} (before, after)" if len(points) == 2 else name


COMPARE_PANELS = [  # (variant key, title, log axis)
    ("quality_vs_full", "quality % of full", False), ("eval_loss_after", "eval loss after", False),
    ("eval_accuracy_after", "eval accuracy after", False), ("eval_exact_match_after", "exact match after", False),
    ("forgetting", "forgetting (retain loss change)", False), ("peak_rss_mb", "peak RSS MiB", False),
    ("tokens_per_s", "tokens/s", False), ("trainable_params", "trainable parameters (log)", True),
    ("export_bytes", "artifact bytes (log)", True)]


def comparison(variants: dict, out: Path) -> Optional[Path]:
    """One bar panel per measured quantity of a compare run, a bar per variant (a panel no
    variant measured is left out; parameter counts and sizes on a log axis, so LoRA's show)."""
    panels = [p for p in COMPARE_PANELS if any(v.get(p[0]) is not None for v in variants.values())]
    if not variants or not panels:
        return None
    plt = _pyplot()
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.6 * rows), squeeze=False)
    names = list(variants)
    for ax, (key, title, log) in zip(axes.flat, panels):
        values = [variants[n].get(key) for n in names]
        drawn = ax.bar(names, [v or 0 for v in values])
        ax.bar_label(drawn, labels=["n/a" if v is None else f"{v:,.3g}" for v in values], fontsize=8)
        if log:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", rotation=30)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    return _save(fig, out / "comparison.png", plt)
