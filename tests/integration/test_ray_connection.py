"""The job's own Ray connection names its head, never "auto": with a second Ray head on the machine,
Ray's address lookups inside the job's workers (Ray Train's placement-group cleaner calls the state
API with no address) still find the job's head, not "multiple active Ray instances"."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cluster.local import HOST, _free_ports, _kill_group
from tests.conftest import ROOT

pytestmark = pytest.mark.integration

PROBE = """
import json, sys
sys.path.insert(0, {root!r})
import ray
from jobs.run import connect

address = connect()

@ray.remote(num_cpus=0)
def lookup():
    import os
    from ray._private.services import canonicalize_bootstrap_address_or_die
    from ray.util.state import list_actors
    try:
        found = canonicalize_bootstrap_address_or_die(None)  # the state API's lookup, as the cleaner's
        list_actors(limit=1)
    except ConnectionError as exc:
        found = f"error: {{exc}}"
    return os.environ.get("RAY_ADDRESS"), found

print("PROBE " + json.dumps({{"driver": address, "worker": ray.get(lookup.remote())}}))
"""


def run_job(client, entrypoint: str) -> tuple[str, str]:
    for attempt in range(60):  # a head that has just started answers before its job agent is ready
        try:
            job = client.submit_job(entrypoint=entrypoint)
            break
        except (RuntimeError, OSError) as exc:  # "No available agent", or a dashboard too busy to answer
            if attempt == 59 or not (isinstance(exc, OSError) or "No available agent" in str(exc)):
                raise
            time.sleep(1)
    for _ in range(1200):
        status = client.get_job_status(job).value
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status, client.get_job_logs(job)
        time.sleep(0.5)
    raise AssertionError(f"job {job} did not end")


@pytest.fixture
def head_client(ray_head):
    """The session head's Jobs API, once the head runs jobs (its start has fully finished)."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(ray_head.address)
    assert run_job(client, "true")[0] == "SUCCEEDED"
    return client


@pytest.fixture
def second_head(head_client):
    """Another Ray head on this machine (no dashboard, no CPUs), stopped by its pid."""
    ray = str(Path(sys.executable).parent / "ray")
    temp = tempfile.mkdtemp(prefix="ftl2-", dir="/tmp")  # short: Ray's socket paths have a limit
    gcs, client, agent, agent_grpc, env_agent, metrics = _free_ports(6)
    proc = subprocess.Popen(
        [ray, "start", "--head", "--block", f"--node-ip-address={HOST}", f"--port={gcs}",
         "--include-dashboard=false", f"--ray-client-server-port={client}",
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--runtime-env-agent-port={env_agent}", f"--metrics-export-port={metrics}",
         f"--temp-dir={temp}", "--num-cpus=0", "--disable-usage-stats"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
    )
    try:
        from ray._private.services import find_gcs_addresses

        for _ in range(240):
            find_gcs_addresses.cache_clear()
            if f"{HOST}:{gcs}" in find_gcs_addresses():
                break
            assert proc.poll() is None, "the second Ray head exited"
            time.sleep(0.25)
        yield f"{HOST}:{gcs}"
    finally:
        _kill_group(proc.pid)
        shutil.rmtree(temp, ignore_errors=True)


def test_the_jobs_workers_find_their_own_head_with_a_second_head_up(ray_head, head_client, second_head, tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE.format(root=str(ROOT)))
    status, logs = run_job(head_client, f"python {probe}")
    assert status == "SUCCEEDED", logs[-3000:]
    seen = json.loads(next(line for line in logs.splitlines() if line.startswith("PROBE "))[6:])
    assert seen["driver"] == ray_head.gcs_address
    assert seen["worker"] == [ray_head.gcs_address, ray_head.gcs_address], (seen, second_head)
