"""The end-of-run summary printed by submit and make demo, read from the run's manifest.

Each kind writes its own lines (launcher/kinds/); the number formats they share are here.
"""

from __future__ import annotations


def format_summary(manifest: dict) -> str:
    """The summary lines of the run's kind (launcher/kinds/), from what the job recorded."""
    from launcher.kinds import get_kind

    s = manifest.get("summary") or {}
    if not s:
        return f"no summary recorded (status {manifest.get('status', 'unknown')})"
    return get_kind(manifest.get("kind", "finetune")).summary(manifest, s)


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
