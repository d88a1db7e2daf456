"""The embedded head on a machine with GPUs: it offers them to Ray, and the planner checks a GPU job
against them (profile local-gpu, read from nvidia-smi at plan time).

No GPU here: `nvidia-smi` is a stand-in script on PATH that prints what the real one prints for
`--query-gpu=index,name,memory.total --format=csv,noheader,nounits` on a two-H100 machine.
"""

import os
import stat

import pytest

from cluster import local
from cluster import profiles as P
from launcher.errors import PlanError
from launcher.jobplan import plan
from launcher.spec import load_spec
from tests.unit.test_plan import SPEC, make_data

H100S = "0, NVIDIA H100 80GB HBM3, 81559\n1, NVIDIA H100 80GB HBM3, 81559\n"


def fake_smi(folder, body: str, monkeypatch) -> None:
    folder.mkdir()
    smi = folder / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\n{body}\n")
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")


@pytest.fixture
def two_h100s(tmp_path, monkeypatch):
    fake_smi(tmp_path / "bin", f"printf '{H100S}'", monkeypatch)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("FTLAUNCH_LOCAL_GPUS", raising=False)


def test_the_local_gpu_profile_reads_the_machines_gpus(two_h100s, monkeypatch):
    profile = P.get_profile("local-gpu")
    assert (profile["gpus"], profile["gpu_model"], profile["gpu_memory_gib"], profile["peak_bf16_tflops"]) == \
        (2, "NVIDIA H100 80GB HBM3", 79.65, 989)
    assert profile["cpus"] >= 1 and profile["memory_gib"] > 0
    # the head offers FTLAUNCH_LOCAL_GPUS of them: the profile plans against what it offers
    monkeypatch.setenv("FTLAUNCH_LOCAL_GPUS", "1")
    assert P.get_profile("local-gpu")["gpus"] == 1
    monkeypatch.setenv("FTLAUNCH_LOCAL_GPUS", "0")
    assert P.get_profile("local-gpu")["gpus"] == 0
    monkeypatch.delenv("FTLAUNCH_LOCAL_GPUS")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert P.get_profile("local-gpu")["gpus"] == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert P.get_profile("local-gpu")["gpus"] == 0


def test_the_embedded_head_offers_the_machines_gpus_or_the_number_set(two_h100s, monkeypatch, tmp_path):
    ports = dict.fromkeys(("gcs", "dashboard", "client", "agent", "agent_grpc", "env_agent", "metrics"), 1)
    assert "--num-gpus=2" in local.head_command("ray", ports, tmp_path, 4, local.local_gpus())
    monkeypatch.setenv("FTLAUNCH_LOCAL_GPUS", "0")
    assert "--num-gpus=0" in local.head_command("ray", ports, tmp_path, 4, local.local_gpus())
    monkeypatch.setenv("FTLAUNCH_LOCAL_GPUS", "two")
    with pytest.raises(local.ClusterError, match="FTLAUNCH_LOCAL_GPUS='two' is not a whole number"):
        local.local_gpus()


def test_a_gpu_job_on_the_embedded_head_is_planned_against_the_machines_gpus(two_h100s, tmp_path, monkeypatch):
    spec = {**SPEC, "data": {"train": make_data(tmp_path)},
            "resources": {"workers": 2, "cpus_per_worker": 1, "gpus_per_worker": 1}}
    job = plan(load_spec(spec), "local")
    assert job.estimate["profile"] == "local-gpu" and job.estimate["fit"]["verdict"] == "fits"
    assert job.estimate["memory_settings"]["precision"] == "bf16"
    three = {**spec, "resources": {**spec["resources"], "workers": 3}}
    with pytest.raises(PlanError, match="cannot-schedule on profile local-gpu"):
        plan(load_spec(three), "local")
    monkeypatch.setenv("FTLAUNCH_LOCAL_GPUS", "1")  # a head told to offer one: two workers do not fit
    with pytest.raises(PlanError, match="cannot-schedule on profile local-gpu"):
        plan(load_spec(spec), "local")
    monkeypatch.delenv("FTLAUNCH_LOCAL_GPUS")
    # nvidia-smi without a driver (it exits 9): the machine has no GPU to offer
    fake_smi(tmp_path / "nodriver", "echo 'NVIDIA-SMI has failed' >&2; exit 9", monkeypatch)
    with pytest.raises(PlanError, match="cannot-schedule on profile local-cpu"):
        plan(load_spec(spec), "local")
