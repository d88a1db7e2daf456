"""`ftlaunch report RUN`: a run folder read back as `report/report.md` and `report/report.html`.

It reads only what the job wrote (manifest.json, metrics*.jsonl, pipeline.json, variants.jsonl),
so a FAILED, STOPPED or still RUNNING run gets a report of what exists. One section per stage,
task or variant, each with its loss, eval and throughput curves; one memory chart of the
planner's estimate against the measured peak RSS. The figures are drawn by launcher/figures.py.
"""

from __future__ import annotations

import base64
import html
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from common.runfolder import median_throughput
from common.runstore import push_back
from common.units import metric as _f
from common.units import pct as _pct
from common.units import size as _size
from launcher.client import find_run
from launcher.kinds import get_kind


@dataclass
class Section:
    """One curve of the run: the plain finetune, or a stage, a task, a variant."""

    title: str  # "train", "stage texture", "task counting", "variant lora_r8"
    name: str  # the stage, task or variant name (file names, memory chart)
    metrics: list  # its metrics records, as written
    status: Optional[str] = None
    error: Optional[str] = None
    facts: list = field(default_factory=list)  # one line each: loss first -> last, ...
    evals: dict = field(default_factory=dict)  # series -> [(step, value)], eval before/after
    measured: dict = field(default_factory=dict)  # peak_rss_mb, rss_start_mb when recorded
    planned: Optional[int] = None  # bytes per worker, the planner's estimate


def write_report(run: str, storage: str = "./runs") -> list[Path]:
    """Write the report of a run folder (or a run id under `storage`); returns the paths written."""
    from launcher import figures

    run_dir, manifest = find_run(run, storage)
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    for old in out.glob("*.png"):  # a rerun's sections may differ: no stale figure stays
        old.unlink()
    kind = get_kind(manifest.get("kind", "finetune"))
    sections = kind.sections(run_dir, manifest)
    planned, why_not = planned_memory(manifest)
    for s in sections:
        s.planned = planned.get(s.name)
    rate = kind.rate_unit(manifest)

    blocks = header(run_dir, manifest)
    blocks += kind.report_blocks(run_dir, manifest, out)
    blocks += memory_blocks(sections, why_not, figures.memory(sections, out))
    for s in sections:
        blocks += [("h2", s.title), ("ul", section_lines(s))]
        drawn = [figures.loss(s, out), figures.evals(s, out), figures.throughput(s, out, rate)]
        blocks += [("img", p.name, p.stem) for p in drawn if p]
        if not s.metrics:
            blocks.append(("p", "No metrics recorded."))
    md, page = out / "report.md", out / "report.html"
    md.write_text(to_markdown(blocks))
    page.write_text(to_html(blocks, out, manifest.get("run_id", run_dir.name)))
    push_back(run_dir, "report")  # a run in object storage: its report goes there too
    return [md, page, *sorted(out.glob("*.png"))]


# ---------------------------------------------------------------------------------------------
# What the run folder holds: each kind's sections (launcher/kinds/) are built from these


def finetune_section(title: str, name: str, folder: Path, summary: dict, status: Optional[str]) -> Section:
    """A finetune's curve (the run, or one compare variant): metrics.jsonl and its summary."""
    metrics = read_jsonl(folder / "metrics.jsonl")
    s = Section(title, name, metrics, status)
    # The eval before any update: in the summary, or (a run that did not finish) where rank 0
    # recorded it at the start, the folder's manifest.
    before = {**read_json(folder / "manifest.json").get("before", {}), **summary}
    last = metrics[-1] if metrics else {}
    for split in ("eval", "retain"):
        for metric in ("loss", "accuracy", "exact_match"):
            key, first = f"{split}_{metric}", before.get(f"{split}_{metric}_before")
            points = [(0, first)] if first is not None else []
            points += [(m["step"], m[key]) for m in metrics if m.get(key) is not None]
            after = summary.get(f"{split}_{metric}_after", last.get(key))
            if after is not None and last and (not points or points[-1][0] < last["step"]):
                points.append((last["step"], after))  # measured at the end, not in the records
            if points:
                s.evals[f"{split} {metric.replace('_', ' ')}"] = points
            if first is not None or after is not None:
                show = _f if metric == "loss" else _pct
                name = metric.replace("_", " ")
                s.facts.append(f"{split} {name} {show(first)} -> {show(after)} (before training -> last)")
    s.facts[:0] = loss_facts(metrics)
    if summary.get("trainable_params"):
        s.facts.append(f"trainable parameters {summary['trainable_params']:,} of {summary.get('total_params') or 0:,}")
    s.measured = {k: summary[k] for k in ("peak_rss_mb", "rss_start_mb") if summary.get(k) is not None}
    return s


def loss_facts(metrics: list, unit: str = "tokens/s") -> list[str]:
    if not metrics:
        return []
    facts = [f"train loss {_f(metrics[0].get('loss'))} -> {_f(metrics[-1].get('loss'))} "
             f"(steps {metrics[0]['step']} -> {metrics[-1]['step']}, {len(metrics)} records)"]
    median = median_throughput(metrics)
    if median is not None:
        facts.append(f"throughput median {median:,.0f} {unit}, last "
                     f"{metrics[-1].get('tokens_per_s') or 0:,.0f} {unit}")
    return facts


def planned_memory(manifest: dict) -> tuple[dict, Optional[str]]:
    """The planner's memory per worker (bytes) for each section's name; or why there is none."""
    plan = manifest.get("plan") or {}
    profile = "local-cpu" if plan.get("target") == "local" else None
    try:
        planned = get_kind(manifest.get("kind", "finetune")).planned_memory(manifest, profile)
    except Exception as exc:  # a report of any run is still written; say why this part is missing
        return {}, f"no planner estimate ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return planned, None if planned else "the planner made no estimate for this spec"


# ---------------------------------------------------------------------------------------------
# Blocks: ("h1" | "h2" | "p", text), ("ul", [lines]), ("img", file, alt), ("table", header, rows);
# rendered twice


def header(run_dir: Path, manifest: dict) -> list:
    plan, summary = manifest.get("plan") or {}, manifest.get("summary") or {}
    started, finished = manifest.get("started"), manifest.get("finished")
    wall = summary.get("wall_time_s")
    if started:
        span = f"{(finished or time.time()) - started:.1f} s {'from start to end' if finished else 'so far'}"
        wall = f"{wall} s training, {span}" if wall is not None else span
    lines = [f"run id: {manifest.get('run_id', run_dir.name)}", f"kind: {manifest.get('kind')}",
             f"status: {manifest.get('status', 'unknown')}"]
    if manifest.get("error"):
        lines.append(f"error: {manifest['error']}")
    lines += [f"wall time: {wall if wall is not None else '-'}",
              f"attempts: {len(manifest.get('attempts') or [])}",
              f"folder: {run_dir.resolve()}"]
    blocks = [("h1", f"Run report: {manifest.get('name') or run_dir.name}"), ("ul", lines),
              ("h2", "Spec"), ("ul", spec_lines(manifest.get("spec") or {}, plan.get("resources")))]
    warnings = plan.get("warnings") or []
    blocks += [("h2", "Plan warnings"), ("ul", warnings) if warnings else ("p", "None.")]
    blocks += [("h2", "Artifacts"), ("ul", artifact_lines(run_dir))]
    return blocks


def spec_lines(spec: dict, resources: Optional[dict] = None) -> list[str]:
    model, strategy, train = spec.get("model") or {}, spec.get("strategy") or {}, spec.get("train") or {}
    res, data = resources or spec.get("resources") or {}, spec.get("data") or {}
    lines = [f"model: {model.get('source')}, seq_len {model.get('seq_len')}"]
    if strategy:
        lines.append(f"strategy: {strategy.get('type')}" + "".join(
            f", {k} {v}" for k, v in strategy.items() if k != "type" and v is not None))
    if data:
        lines.append(f"data: {data.get('task')}; train {data.get('train')}; eval {data.get('eval')}")
    if train:
        keys = ("max_steps", "micro_batch", "lr", "report_every") if train.get("max_steps") else (
            "epochs", "micro_batch", "lr", "report_every")
        shown = [f"{k} {train[k]}" for k in keys if train.get(k) is not None]
        shown = shown or [f"{k} {v}" for k, v in train.items() if v is not None]  # a pipeline's shared settings
        lines.append("train: " + ", ".join(shown))
    if res:  # the plan's: it counts a multitask run's workers
        lines.append(f"resources: {res.get('workers', '-')} workers x {res.get('cpus_per_worker')} CPU, "
                     f"{res.get('gpus_per_worker', 0)} GPU")
    return lines + get_kind(spec.get("kind", "finetune")).spec_lines(spec)


def artifact_lines(run_dir: Path) -> list[str]:
    """Each top-level entry of the run folder with its size (a folder: its files' total)."""
    lines = []
    for entry in sorted(run_dir.iterdir()):
        if entry.name == "report":
            continue
        files = [entry] if entry.is_file() else [f for f in entry.rglob("*") if f.is_file()]
        size = _size(sum(f.stat().st_size for f in files))
        lines.append(f"{entry.name}: {size}" if entry.is_file() else f"{entry.name}/: {len(files)} files, {size}")
    return lines


def section_lines(s: Section) -> list[str]:
    return [f"status: {s.status or '-'}"] + ([f"error: {s.error}"] if s.error else []) + s.facts


def memory_blocks(sections: list, why_not: Optional[str], chart: Optional[Path]) -> list:
    lines = []
    for s in sections:
        planned = f"planned {_size(s.planned)}" if s.planned is not None else "planned: none"
        m = s.measured
        measured = (f"measured peak RSS {m['peak_rss_mb']:,.0f} MiB ({m['peak_rss_mb'] - m['rss_start_mb']:+,.0f} "
                    f"MiB over the worker's start)" if m else "measured: not recorded")
        lines.append(f"{s.name}: {planned}; {measured}")
    notes = ("Planned: the planner's estimate per worker (weights, gradients, optimizer, activations). "
             "Measured: the rank-0 worker's peak RSS, which also holds the Python and torch runtime; "
             "its rise over the worker's start is the closer match to the estimate.")
    blocks = [("h2", "Memory per worker: planned vs measured"), ("p", notes), ("ul", lines)]
    if why_not:
        blocks.append(("p", f"Planned side missing: {why_not}."))
    if chart:
        blocks.append(("img", chart.name, "memory"))
    return blocks


def to_markdown(blocks: list) -> str:
    out = []
    for kind, *rest in blocks:
        if kind == "h1":
            out += [f"# {rest[0]}", ""]
        elif kind == "h2":
            out += [f"## {rest[0]}", ""]
        elif kind == "p":
            out += [rest[0], ""]
        elif kind == "ul":
            out += [f"- {line}" for line in rest[0]] + [""]
        elif kind == "img":
            out += [f"![{rest[1]}]({rest[0]})", ""]
        elif kind == "table":
            head, rows = rest
            out += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
            out += ["| " + " | ".join(row) + " |" for row in rows] + [""]
    return "\n".join(out)


def to_html(blocks: list, folder: Path, title: str) -> str:
    """One self-contained page: the PNGs are embedded, the page can be mailed or archived."""
    e = html.escape
    body = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "p"):
            body.append(f"<{kind}>{e(rest[0])}</{kind}>")
        elif kind == "ul":
            body.append("<ul>" + "".join(f"<li>{e(line)}</li>" for line in rest[0]) + "</ul>")
        elif kind == "img":
            data = base64.b64encode((folder / rest[0]).read_bytes()).decode()
            body.append(f'<img alt="{e(rest[1])}" title="{e(rest[0])}" src="data:image/png;base64,{data}">')
        elif kind == "table":
            head, rows = rest
            body.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>" + "".join(
                "<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows) + "</table>")
    style = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto}img{max-width:100%;display:block}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}")
    return (f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{e(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def read_jsonl(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
