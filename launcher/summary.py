"""The end-of-run summary printed by submit and make demo, read from the run's manifest.

Each kind writes its own lines (launcher/kinds/); the number formats are common/units.py.
"""

from __future__ import annotations


def format_summary(manifest: dict) -> str:
    """The summary lines of the run's kind (launcher/kinds/), from what the job recorded."""
    from launcher.kinds import get_kind

    s = manifest.get("summary") or {}
    if not s:
        return f"no summary recorded (status {manifest.get('status', 'unknown')})"
    return get_kind(manifest.get("kind", "finetune")).summary(manifest, s)
