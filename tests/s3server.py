"""A real S3 API server for the tests: moto's standalone server, in its own process on a free
loopback port. Tests reach it through pyarrow URIs (`S3Server.uri`), as a user's MinIO would be."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


class S3Server:
    def __init__(self, proc: subprocess.Popen, port: int):
        self.proc, self.port = proc, port
        self.endpoint = f"http://127.0.0.1:{port}"

    @classmethod
    def start(cls, timeout: float = 60) -> "S3Server":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        server, deadline = cls(proc, port), time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the S3 server (moto) exited with {proc.returncode}")
            try:
                urllib.request.urlopen(f"{server.endpoint}/moto-api/", timeout=2).close()
                return server
            except OSError:
                time.sleep(0.2)
        server.stop()
        raise RuntimeError(f"the S3 server (moto) did not answer on {server.endpoint} in {timeout:g} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    # -- what tests use ------------------------------------------------------------------------

    @property
    def query(self) -> str:
        return f"endpoint_override=127.0.0.1:{self.port}&scheme=http&region=us-east-1"

    def uri(self, bucket: str, key: str = "") -> str:
        """The pyarrow URI of s3://bucket/key on this server."""
        return f"s3://{bucket}/{key}?{self.query}"

    def filesystem(self):
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{self.port}", scheme="http", region="us-east-1",
                                 allow_bucket_creation=True)

    def bucket(self, name: str) -> str:
        self.filesystem().create_dir(name)
        return name

    def upload(self, local: Path | str, bucket: str, key: str) -> str:
        """Copy a local file or folder to s3://bucket/key; returns its URI."""
        import pyarrow.fs as pafs

        local = Path(local)
        pafs.copy_files(str(local), f"{bucket}/{key}", destination_filesystem=self.filesystem())
        return self.uri(bucket, key)
