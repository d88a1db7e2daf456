"""Test tiers: unit (no network), integration (one real local Ray head per session), gpu."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Before anything imports Ray: no usage stats, loopback stays loopback, auth decided explicitly.
os.environ.update({
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_AUTH_MODE": "disabled",
    "HF_HUB_OFFLINE": "1",
})
# A credential the session's head inherits (as a user's exported token would be): tests check
# jobs can read it through an env: reference and that its value is written nowhere.
os.environ.setdefault("FTL_TEST_SECRET", "ftl-secret-" + os.urandom(12).hex())


@pytest.fixture(scope="session")
def ftl_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("ftlaunch-home")
    os.environ["FTLAUNCH_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def ray_head(ftl_home):
    """The session's one embedded Ray head on loopback, stopped by pid at the end."""
    from cluster import local

    head = local.up(num_cpus=int(os.environ.get("FTLAUNCH_TEST_CPUS", 2)))
    os.environ["RAY_ADDRESS"] = head.address
    yield head
    local.down()


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
