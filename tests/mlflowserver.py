"""A real MLflow tracking server for the tests: `mlflow server` with an sqlite store and proxied
artifacts in its own folder, on a free loopback port, in its own process group (the server and
the uvicorn worker it starts), stopped through the pid of the process this module started."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.servers import free_port, stop_group, wait_until_up


class MlflowServer:
    def __init__(self, proc: subprocess.Popen, port: int, folder: Path):
        self.proc, self.port, self.folder = proc, port, folder
        self.uri = f"http://127.0.0.1:{port}"

    @classmethod
    def start(cls, folder: Path, timeout: float = 90) -> "MlflowServer":
        folder.mkdir(parents=True, exist_ok=True)
        port = free_port()
        mlflow = Path(sys.executable).with_name("mlflow")
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner (huey)
        with open(folder / "server.log", "wb") as log:
            proc = subprocess.Popen(
                [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                 "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
                 "--artifacts-destination", str(folder / "artifacts")],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        server = cls(proc, port, folder)
        wait_until_up(proc, f"{server.uri}/health", "MLflow server", timeout, lambda: ": " + server.log_tail())
        return server

    def log_tail(self) -> str:
        return (self.folder / "server.log").read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        """The server and the uvicorn worker it starts: one process group, led by the pid started here."""
        stop_group(self.proc)

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.uri)
