"""Test tiers: unit (no network), integration (one real local Ray head per session), gpu."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The session's FTLAUNCH_HOME, and in it the token of the session's head: Ray's token auth is on,
# as for every user. Set before anything imports Ray, which reads its auth mode once per process
# (a test process that first used Ray with auth off would never send the token later).
_HOME = Path(tempfile.mkdtemp(prefix="ftlaunch-home-"))
os.environ.update({
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_OFFLINE": "1",
    "FTLAUNCH_HOME": str(_HOME),
})
os.environ.pop("FTLAUNCH_RAY_AUTH_MODE", None)
sys.path.insert(0, str(ROOT))
from cluster import local as _local  # noqa: E402

_local.ensure_token()
os.environ.update(_local.auth_env())
# A credential the session's head inherits (as a user's exported token would be): tests check
# jobs can read it through an env: reference and that its value is written nowhere.
os.environ.setdefault("FTL_TEST_SECRET", "ftl-secret-" + os.urandom(12).hex())
# The S3 tests' credentials, in the environment the session's head inherits, as a cluster's would
# be (the README: export AWS_* before ftlaunch cluster up). The loopback S3 server takes any key;
# the EC2 metadata lookup stays off (it would leave loopback).
os.environ.update({"AWS_ACCESS_KEY_ID": "ftlaunch-test", "AWS_SECRET_ACCESS_KEY": "ftlaunch-test-secret",
                   "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"})
# The trackers' clients stay on loopback (no usage telemetry) and write their caches and staged
# artifacts under the session's home, not the user's.
os.environ.update({"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "WANDB_SILENT": "true",
                   **{f"WANDB_{d}_DIR": str(_HOME / "wandb" / d.lower()) for d in ("DATA", "CACHE", "CONFIG")}})


@pytest.fixture(scope="session")
def ftl_home():
    os.environ["FTLAUNCH_HOME"] = str(_HOME)
    yield _HOME
    shutil.rmtree(_HOME, ignore_errors=True)


class SessionHead:
    """The session's one embedded Ray head on loopback (stopped by pid at the end).

    `ray start --block` tears the whole head down when any one of its processes exits unexpectedly
    (a dashboard agent killed for memory on a loaded 2-core runner, say). Then every later test
    would fail on a dead address; instead the next test finds it dead, prints why (the tail of the
    head's log and Ray's process-exit log) and starts a new one, so one environmental crash costs
    the test that was running, not the rest of the session. Attributes are the current head's.
    """

    def __init__(self, cpus: int):
        self.cpus, self.restarts = cpus, 0
        self.head = self._up()

    def _up(self):
        from cluster import local

        head = local.up(num_cpus=self.cpus)
        os.environ["RAY_ADDRESS"] = head.address
        return head

    def __getattr__(self, name):
        return getattr(self.head, name)

    def restart(self) -> list[dict]:
        """Stop the head as `ftlaunch cluster down` does and start a new one on new ports (a test
        that loses its head on purpose); the manifests of the runs it marked LOST."""
        from launcher.client import embedded_head_down

        _, lost = embedded_head_down()
        self.head = self._up()
        return lost

    def ensure_alive(self) -> None:
        from cluster import local

        if self.head.alive:
            return
        sys.stderr.write(f"\n*** the session's Ray head died; restarting it. Why:\n{head_death(self.head)}\n")
        local.down()
        self.restarts += 1
        self.head = self._up()


def head_death(head) -> str:
    """The last lines of the head's log and of Ray's process-exit log (which process died, how)."""
    out = []
    for path in [Path(head.log), *Path(head.temp_dir).glob("session_*/logs/ray_process_exit.log")]:
        try:
            lines = path.read_text(errors="replace").splitlines()[-25:]
        except OSError:
            continue
        out += [f"--- {path}", *lines]
    return "\n".join(out) or "(no log found)"


_SESSION_HEAD: list = []


@pytest.fixture(scope="session")
def ray_head(ftl_home):
    """The session's one embedded Ray head on loopback (see SessionHead)."""
    from cluster import local

    head = SessionHead(int(os.environ.get("FTLAUNCH_TEST_CPUS", 2)))
    _SESSION_HEAD.append(head)
    yield head
    _SESSION_HEAD.clear()
    local.down()


@pytest.fixture(autouse=True, scope="module")
def _head_alive_for_module():
    """Before a module's fixtures connect to it: the session head, if started, is alive."""
    if _SESSION_HEAD:
        _SESSION_HEAD[0].ensure_alive()
    yield


@pytest.fixture(autouse=True)
def _head_alive_for_test():
    if _SESSION_HEAD:
        _SESSION_HEAD[0].ensure_alive()
    yield


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API server (moto's) on a free loopback port for the session, stopped by its pid."""
    from tests.s3server import S3Server

    server = S3Server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (sqlite store, its own folder) on a free loopback port for the
    session, stopped by its pid."""
    from tests.mlflowserver import MlflowServer

    server = MlflowServer.start(tmp_path_factory.mktemp("mlflow"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    from launcher.synthetic import make_demo

    out = tmp_path_factory.mktemp("data")
    return {k: str(v) for k, v in make_demo(out, rows=1200).items()}


@pytest.fixture
def tiny_spec(demo_data, tmp_path):
    """A small LoRA finetune spec as a dict: ~20 s on 2 CPUs."""
    return {
        "kind": "finetune",
        "name": "t-lora",
        "model": {"source": "tiny-llama", "seq_len": 40},
        "strategy": {"type": "lora", "r": 8, "alpha": 16},
        "data": {"train": demo_data["train"], "eval": demo_data["eval"], "retain": demo_data["retain"]},
        "train": {"max_steps": 30, "micro_batch": 16, "lr": 0.01, "report_every": 10, "eval_batches": 2},
        "resources": {"workers": 2, "cpus_per_worker": 0.5},
        "storage": str(tmp_path / "runs"),
    }


def ftlaunch_cli() -> list[str]:
    return [sys.executable, "-m", "launcher.cli.main"]
