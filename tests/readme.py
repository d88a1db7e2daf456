"""The README's fenced shell command lines, for the tests that run them (so the README cannot drift)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

README = Path(__file__).resolve().parent.parent / "README.md"
SHELL_BLOCK = re.compile(r"^```(?:bash|sh|shell)\n(.*?)^```", re.M | re.S)


def shell_blocks() -> list[str]:
    return SHELL_BLOCK.findall(README.read_text())


def command_lines(program: str, blocks: Optional[list[str]] = None) -> list[str]:
    """Every line of the README's shell blocks (or of `blocks`) that runs `program`, in order, as written."""
    return [line.strip() for block in (shell_blocks() if blocks is None else blocks)
            for line in block.splitlines() if line.strip().split(" ", 1)[0] == program]
