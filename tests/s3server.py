"""A real S3 API server for the tests: moto's standalone server, in its own process on a free
loopback port. Tests reach it through pyarrow URIs (`S3Server.uri`), as a user's MinIO would be."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.servers import free_port, stop_group, wait_until_up


class S3Server:
    def __init__(self, proc: subprocess.Popen, port: int):
        self.proc, self.port = proc, port
        self.endpoint = f"http://127.0.0.1:{port}"

    @classmethod
    def start(cls, timeout: float = 60) -> "S3Server":
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        server = cls(proc, port)
        wait_until_up(proc, f"{server.endpoint}/moto-api/", "S3 server (moto)", timeout)
        return server

    def stop(self) -> None:
        stop_group(self.proc)

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
