"""What the test session's loopback servers (tests/s3server.py, tests/mlflowserver.py) share: a
free port, the wait for the first answer, the stop of the process group the test started."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from typing import Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(proc: subprocess.Popen, url: str, name: str, timeout: float,
                  detail: Callable[[], str] = lambda: "") -> None:
    """Return once `url` answers; raise (after stopping `proc`) if it exits or never answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the {name} exited with {proc.returncode}{detail()}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            time.sleep(0.2)
    stop_group(proc)
    raise RuntimeError(f"the {name} did not answer on {url} in {timeout:g} s{detail()}")


def stop_group(proc: subprocess.Popen, grace: float = 15) -> None:
    """SIGTERM to the process group led by `proc` (started with start_new_session), then SIGKILL."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
