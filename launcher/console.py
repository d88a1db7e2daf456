"""What `submit` and `logs -f` show of a job's log while following it: ftlaunch's own lines, or
everything with `--verbose`.

The job's log (Ray's Jobs API log, and `<run>/logs/driver.log`) keeps every line: Ray's INFO lines,
its actors' echoed output, transformers' and DeepSpeed's warnings. The console gets the job's
`[ftlaunch] ...` lines (the run, progress, stages, tasks, failures) and its `ftlaunch: ...` lines,
without Ray's `(RayTrainWorker pid=N)` prefix and colours. The `[ftlaunch] summary {json}` line is
for machines: the client prints the readable summary from the manifest instead.
"""

from __future__ import annotations

import re
import sys
from typing import Optional, TextIO

COLOUR = re.compile(r"\x1b\[[0-9;]*m")
ACTOR_PREFIX = re.compile(r"^\([^()]*pid=\d+[^()]*\) ")  # (TrainController pid=8669) , (pid=7, ip=10.0.0.2)
OWN = ("[ftlaunch] ", "ftlaunch: ")
MACHINE_ONLY = ("[ftlaunch] summary {",)


def shown(line: str) -> Optional[str]:
    """The console form of one log line (no newline), or None when it is noise."""
    plain = ACTOR_PREFIX.sub("", COLOUR.sub("", line)).rsplit("\r", 1)[-1]
    if plain.startswith(OWN) and not plain.startswith(MACHINE_ONLY):
        return plain
    return None


class Console:
    """Takes a job's log text in the pieces it arrives in; writes whole lines, each with its
    newline and flushed, so a line of ours is never glued to the next one written."""

    def __init__(self, verbose: bool = False, out: Optional[TextIO] = None):
        self.verbose = verbose
        self.out = out
        self._partial = ""

    def write(self, text: str) -> None:
        *lines, self._partial = (self._partial + text).split("\n")
        for line in lines:
            self._line(line)

    def close(self) -> None:
        """The last line, if the log ended without a newline."""
        if self._partial:
            self._line(self._partial)
            self._partial = ""

    def _line(self, line: str) -> None:
        text = line if self.verbose else shown(line)
        if text is not None:
            out = self.out or sys.stdout
            out.write(text + "\n")
            out.flush()
