"""Durable logs: a process's stdout and stderr copied into the run folder as they are written.

Ray keeps a job's logs on the cluster, which may be gone when someone asks for them. The driver
and every training worker tee their file descriptors 1 and 2 into `<run_dir>/logs/<name>.log`:
everything the process and its libraries print (C extensions included) still reaches Ray's own
log as before. Secret values (environment references of the spec, see `secret_values`) are
replaced by `***` on both paths.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

REDACTED = b"***"


def secret_values(env_spec: dict) -> list[str]:
    """The values of the spec's secret references, as this process sees them (never logged)."""
    values = []
    for key, ref in (env_spec or {}).items():
        if str(ref).startswith("env:"):
            values.append(os.environ.get(ref[len("env:"):]) or os.environ.get(key))
        elif str(ref).startswith("secret:"):  # Kubernetes put the Secret's value in `key`
            values.append(os.environ.get(key))
    return [v for v in values if v]


def resolve_env_refs(env_spec: dict) -> list[str]:
    """`KEY: env:NAME` -> KEY gets NAME's value from this process's (the cluster's) environment.

    The value is read where the job runs; it never travels through the client, the job's
    metadata or the run folder. A missing variable fails the job with what to set. Returns the
    names set (names only are recorded).
    """
    resolved = []
    for key, ref in (env_spec or {}).items():
        if not str(ref).startswith("env:"):
            continue
        name = ref[len("env:"):]
        if name not in os.environ:
            raise RuntimeError(
                f"env.{key}: {name} is not set in the cluster's environment; set it where the Ray "
                "head runs (local: export it, then ftlaunch cluster down && ftlaunch cluster up)")
        os.environ[key] = os.environ[name]
        resolved.append(key)
    return resolved


class Tee:
    """Copy fds 1 and 2 into `path` (appending) until exit; redact `secrets` on both copies."""

    def __init__(self, path, secrets=(), header: str | None = None):
        self.path = Path(path)
        self.secrets = [s.encode() for s in secrets if s]
        self.header = header
        self._keep = max((len(s) for s in self.secrets), default=1) - 1  # a secret split over reads

    def __enter__(self) -> "Tee":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "ab", buffering=0)
        if self.header:
            self._file.write(f"=== {self.header} {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} ===\n".encode())
        _flush()
        self._saved = (os.dup(1), os.dup(2))
        read_end, write_end = os.pipe()
        os.dup2(write_end, 1)
        os.dup2(write_end, 2)
        os.close(write_end)
        self._thread = threading.Thread(target=self._pump, args=(read_end,), daemon=True, name="ftlaunch-tee")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        _flush()
        os.dup2(self._saved[0], 1)  # the pipe's last writers go: the pump reads to its end
        os.dup2(self._saved[1], 2)
        self._thread.join(timeout=5)
        for fd in self._saved:
            os.close(fd)
        self._file.close()

    def _pump(self, read_end: int) -> None:
        carry = b""
        try:
            while True:
                chunk = os.read(read_end, 65536)
                if not chunk:
                    break
                data = self._redact(carry + chunk)
                cut = max(0, len(data) - self._keep) if self.secrets else len(data)
                cut = _char_boundary(data, cut)  # readers of the file decode what is there
                out, carry = data[:cut], data[cut:]
                if out:
                    self._emit(out)
            if carry:
                self._emit(self._redact(carry))
        finally:
            os.close(read_end)

    def _redact(self, data: bytes) -> bytes:
        for secret in self.secrets:
            data = data.replace(secret, REDACTED)
        return data

    def _emit(self, data: bytes) -> None:
        for write in (lambda d: os.write(self._saved[0], d), self._file.write):
            try:
                write(data)
            except OSError:  # one copy failing (a closed terminal) must not stop the other
                pass


def _char_boundary(data: bytes, cut: int) -> int:
    """The largest cut <= `cut` that splits no UTF-8 character."""
    while 0 < cut < len(data) and data[cut] & 0xC0 == 0x80:
        cut -= 1  # data[cut] continues a character: move back to its first byte
    if cut == len(data):
        for back in range(1, min(4, cut) + 1):  # an unfinished character at the very end
            lead = data[cut - back]
            if lead & 0xC0 == 0xC0:
                need = 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
                return cut - back if need > back else cut
            if lead & 0x80 == 0:
                break
    return cut


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, ValueError):
            pass
