"""The end-of-run summary printed by submit and make demo, read from the run's manifest."""

from __future__ import annotations


def format_summary(manifest: dict) -> str:
    s = manifest.get("summary") or {}
    if not s:
        return f"no summary recorded (status {manifest.get('status', 'unknown')})"
    if s.get("stages"):
        return _pipeline_summary(manifest, s)
    if s.get("variants"):
        return _compare_summary(manifest, s)
    if s.get("export") == "adapters":
        return _multitask_summary(manifest, s)
    trainable, total = s.get("trainable_params") or 0, s.get("total_params") or 0
    pct = f" ({100 * trainable / total:.2f}%)" if total else ""
    lines = [
        f"run            {manifest.get('run_id')}",
        f"loss           {_f(s.get('loss_first'))} -> {_f(s.get('loss_last'))} over {s.get('steps')} steps",
        f"eval loss      {_f(s.get('eval_loss_before'))} -> {_f(s.get('eval_loss_after'))}",
    ]
    if s.get("eval_accuracy_before") is not None:
        lines.append(f"eval accuracy  {_pct(s['eval_accuracy_before'])} -> {_pct(s.get('eval_accuracy_after'))}")
    if s.get("retain_loss_before") is not None:
        delta = s["retain_loss_after"] - s["retain_loss_before"]
        lines.append(f"retain loss    {_f(s['retain_loss_before'])} -> {_f(s['retain_loss_after'])}"
                     f" (forgetting {delta:+.4f})")
    if s.get("retain_accuracy_before") is not None:
        delta = s["retain_accuracy_after"] - s["retain_accuracy_before"]
        lines.append(f"retain acc.    {_pct(s['retain_accuracy_before'])} -> {_pct(s['retain_accuracy_after'])}"
                     f" ({100 * delta:+.1f} points)")
    if s.get("strategy"):
        groups = ", ".join(f"{g['name']} {g['lr']:g}" for g in s.get("lr_groups") or [])
        lines.append(f"strategy       {s['strategy']}" + (f"; lr groups: {groups}" if groups else ""))
    if s.get("unfrozen_at"):
        lines.append("unfrozen       " + ", ".join(f"{n} params at step {k}" for k, n in s["unfrozen_at"].items()))
    if s.get("peak_rss_mb") is not None:
        lines.append(f"peak memory    {s['peak_rss_mb']:.0f} MiB RSS per worker "
                     f"({s['peak_rss_mb'] - s['rss_start_mb']:+.0f} MiB over its start)")
    lines += [
        f"parameters     {trainable:,} trainable / {total:,} total{pct}",
        f"{s.get('export', 'export'):<15}{_size(s.get('export_bytes'))}",
        f"wall time      {s.get('wall_time_s')} s",
        f"artifacts      {manifest.get('plan', {}).get('run_dir', '?')}",
    ]
    return "\n".join(lines)


def _f(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _size(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024


def _pipeline_summary(manifest: dict, s: dict) -> str:
    lines = [f"run            {manifest.get('run_id')}",
             f"accuracy       {_f(s.get('accuracy_before'))} -> {_f(s.get('accuracy_after'))} over {len(s['stages'])} stages"]
    for name, st in s["stages"].items():
        lines.append(f"  stage {name:<12} {st.get('steps')} steps, accuracy {_f(st.get('accuracy_before'))} -> "
                     f"{_f(st.get('accuracy_after'))}, loss {_f(st.get('loss_last'))}, "
                     f"{st.get('trainable_params') or 0:,} trainable")
    lines += [f"wall time      {s.get('wall_time_s')} s",
              f"artifacts      {manifest.get('plan', {}).get('run_dir', '?')} (pipeline.json, stages/)"]
    return "\n".join(lines)


def _compare_summary(manifest: dict, s: dict) -> str:
    """One line per variant of a `kind: compare` run, and where its report is."""
    lines = [f"run            {manifest.get('run_id')}"]
    for name, v in s["variants"].items():
        quality = f", {v['quality_vs_full']:.1f}% of full" if v.get("quality_vs_full") is not None else ""
        acc = f", accuracy {v['eval_accuracy_after']:.3f}" if v.get("eval_accuracy_after") is not None else ""
        lines.append(f"{name:<14} {v.get('strategy')}: {v.get('trainable_params') or 0:,} trainable, "
                     f"eval loss {_f(v.get('eval_loss_before'))} -> {_f(v.get('eval_loss_after'))}"
                     f"{acc}{quality}")
    lines.append(f"report         {manifest.get('plan', {}).get('run_dir', '?')}/{s.get('report')}")
    return "\n".join(lines)


def _multitask_summary(manifest: dict, s: dict) -> str:
    """One line per adapter of a `kind: multitask` run, and how to use them."""
    run = manifest.get("run_id")
    layout = "packed on one base" if s.get("packing") else "one worker per adapter"
    lines = [f"run            {run}", f"layout         {layout}"]
    for name, t in s.get("tasks", {}).items():
        ev = t.get("eval") or {}
        kept = " (kept from an earlier attempt)" if name in s.get("kept", []) else ""
        lines.append(f"  task {name:<14} {t.get('steps')} steps, eval loss {_f(ev.get('eval_loss_before'))} -> "
                     f"{_f(ev.get('eval_loss'))}, {t.get('trainable_params') or 0:,} trainable, "
                     f"{_size(t.get('bytes'))}{kept}")
    lines += [f"adapters       {_size(s.get('export_bytes'))} in all; ftlaunch adapters list {run}",
              f"wall time      {s.get('wall_time_s')} s",
              f"artifacts      {manifest.get('plan', {}).get('run_dir', '?')} (registry.json, adapters/)"]
    return "\n".join(lines)
