"""How ftlaunch writes numbers for people: bytes in binary units (KiB, MiB, GiB, never KB/GB),
shares as percentages, metrics to four places. One place, so plan, summary, report and the CLI
agree; "-" stands for a value that was not measured."""

from __future__ import annotations

from typing import Optional

GIB = 2**30
_UNITS = (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10))


def size(n: Optional[float], digits: int = 1) -> str:
    """Bytes in the unit that shows them (a tiny model is not '0.00 GiB')."""
    if n is None:
        return "-"
    for unit, scale in _UNITS:
        if abs(n) >= scale:
            return f"{n / scale:.{digits}f} {unit}"
    return f"{n:.0f} B"


def gib(n: float) -> str:
    """Bytes in GiB, two places: memory figures compared against a GPU's."""
    return f"{n / GIB:.2f} GiB"


def pct(x: Optional[float]) -> str:
    """A share (0..1) as a percentage."""
    return "-" if x is None else f"{100 * x:.1f}%"


def metric(x: Optional[float]) -> str:
    """A loss or score to four places."""
    return "-" if x is None else f"{x:.4f}"
