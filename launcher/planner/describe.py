"""How `ftlaunch plan` prints an estimate: sizes in a unit that shows them, durations, the
parameter, memory, fit and time lines, and a pipeline's stages."""

from __future__ import annotations

from common import units
from common.units import gib
from launcher.planner.memory import GB


def size(n: float) -> str:
    return units.size(n, 2)


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _share(p: dict) -> str:
    """The trainable share of the printed total; of the base model too when an adapter adds to it."""
    of_all = 100.0 * p["trainable"] / p["total"] if p["total"] else 0.0
    base = p.get("base_total", p["total"])
    if base == p["total"]:
        return f"{of_all:.2f}% of the total"
    return f"{of_all:.2f}% of the total; {100.0 * p['trainable'] / base:.2f}% of the base's {base:,}"


def format_estimate(est: dict) -> str:
    p, m, f, t = est["parameters"], est["memory"], est["fit"], est["time"]
    unit = "per GPU" if est["resources"]["gpus_per_worker"] else "per worker (CPU memory)"
    lines = [
        f"model {est['model']}, strategy {est['strategy']}, profile {est['profile']}",
        f"  parameters  total {p['total']:,}   trainable {p['trainable']:,} ({_share(p)})",
    ]
    if "lora_closed_form" in p:
        lines.append(f"              LoRA closed form sum r*(d_in+d_out) = {p['lora_closed_form']:,}")
    s = est["memory_settings"]
    lines.append(
        f"  memory {unit} (workers {s['workers']}, micro_batch {s['micro_batch']}, seq_len {s['seq_len']}, "
        f"{s['precision']}{' autocast' if s.get('autocast') and s['precision'] != 'fp32' else ''}"
        f"{', 16-bit frozen base' if s.get('base_16bit') else ''}, ZeRO-{s['zero_stage']}"
        f"{', grad checkpointing' if s['grad_checkpointing'] else ''})"
    )
    if s.get("grad_accumulation", 1) > 1 or s.get("effective_batch"):
        lines.append(f"  batch       {s['micro_batch']} x {s.get('grad_accumulation', 1)} accumulated x "
                     f"{s['workers']} worker(s) = {s.get('effective_batch')} rows per optimizer step")
    for key in ("weights", "gradients", "optimizer", "activations", "total"):
        lines.append(f"    {key:<12}{size(m[key]):>14}")
        if key == "activations" and m.get("activation_terms"):
            parts = [f"{k.replace('_', ' ')} {size(v)}" for k, v in m["activation_terms"].items() if v]
            lines.append(f"      ({', '.join(parts)})")
    if m.get("optimizer_step_temp", 0) > m["activations"]:
        lines.append(f"    (the peak is at the optimizer step: {size(m['optimizer_step_temp'])} of AdamW "
                     "temporaries "
                     "instead of the activations)")
    if m["cpu_offload"]:
        lines.append(f"    {'CPU offload':<12}{size(m['cpu_offload']):>14} (CPU memory per worker)")
    lines.append(f"  verdict     {f['verdict']}" + (f": {f['reason']}" if f["reason"] else ""))
    for sug in f["suggestions"]:
        lines.append(f"    would fit: {sug['args']} -> {size(sug['per_gpu_bytes'])} {unit.split(' (')[0]}"
                     f"  # {sug['change']}")
    if f["verdict"] != "fits" and not f["suggestions"]:
        lines.append("    no single change the planner knows would make it fit")
    if t:
        hours = (f", {t['gpu_hours']:.3g} GPU-hours" if t["gpu_hours"] else
                 f", {t['device_hours']:.3g} CPU-core-hours")
        per_step = f", {t['seconds_per_step']:.3g} s per optimizer step" if t.get("seconds_per_step") else ""
        lines.append(f"  time        {duration(t['seconds'])} for {t['tokens']:,} tokens{hours}{per_step} "
                     f"(MFU {t['mfu']:.0%} assumed)")
    return "\n".join(lines)


def format_pipeline_estimate(est: dict) -> str:
    lines = [f"pipeline of {len(est['stages'])} stage(s), model {est['model']}"]
    groups = est["stages"][0]["parameters"]["groups"]
    lines.append("  groups      " + ", ".join(f"{g} {n:,}" for g, n in groups.items()))
    for e in est["stages"]:
        lines += ["", f"stage {e['stage']} (trains {', '.join(e['parameters']['train'])})",
                  *format_estimate(e).splitlines()[1:]]
        if e["resources"]["gpus_per_worker"]:
            total = e["memory"]["total"]
            where = "within" if total <= 25 * GB else "over"
            lines.append(f"  design      {gib(total)} per GPU: {where} the design's 20-25 GB "
                         f"({gib(20 * GB)} to {gib(25 * GB)}) per stage")
    return "\n".join(lines)
