"""Two Ray nodes: a second node joins the session's head on this machine (`ray start --address`
through tests/ray_worker_node.py, with its own temp dir and scratch folder, as a second machine's
disk would be; stopped by its pid),
and a 2-worker finetune with its run in S3 spreads one worker per node. The second node is then
killed (SIGKILL to its process tree, as a crashed machine): Ray Train starts the lost worker
again from the checkpoint in the bucket and the job finishes with every step reported once."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import launcher

pytestmark = pytest.mark.integration


def _crash(pid: int) -> None:
    """SIGKILL the node's whole process group (ours: started in its own session), as a machine
    that is switched off: no process of it unregisters or cleans up."""
    import psutil

    try:
        group = os.getpgid(pid)
    except ProcessLookupError:
        return
    procs = [p for p in psutil.process_iter() if _pgid(p.pid) == group]
    os.killpg(group, signal.SIGKILL)
    psutil.wait_procs(procs, timeout=15)


def _pgid(pid: int):
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _alive_nodes(address: str) -> list[dict]:
    from ray.util.state import list_nodes

    return [n for n in list_nodes(address=address, detail=True, raise_on_missing_output=False)
            if n.state == "ALIVE"]


@contextlib.contextmanager
def joined_node(ray_head, tmp_path, name: str, resources: dict):
    """A node of the session's head (1 CPU, `resources`), with its own scratch, started by
    tests/ray_worker_node.py and stopped by its pid."""
    from cluster import local

    scratch = tmp_path / f"{name}-scratch"
    temp_dir = Path("/tmp") / f"ftl-{name[-1]}-{os.getpid()}"  # short: Ray's socket paths have a limit
    ports = local._free_ports(5)
    cmd = [sys.executable, str(Path(__file__).resolve().parent.parent / "ray_worker_node.py"), "start", "--block",
           f"--address={ray_head.gcs_address}", f"--node-ip-address={local.HOST}",
           "--num-cpus=1", "--num-gpus=0", f"--resources={json.dumps(resources)}", f"--temp-dir={temp_dir}",
           f"--node-manager-port={ports[0]}", f"--object-manager-port={ports[1]}",
           f"--dashboard-agent-listen-port={ports[2]}", f"--dashboard-agent-grpc-port={ports[3]}",
           f"--metrics-export-port={ports[4]}", "--disable-usage-stats"]
    env = {**os.environ, **local.auth_env(), "FTLAUNCH_SCRATCH": str(scratch),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    log_path = tmp_path / f"{name}.log"
    log = open(log_path, "wb")
    known = {n.node_id for n in _alive_nodes(ray_head.address)}
    before = len(known)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while len(_alive_nodes(ray_head.address)) <= before:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, f"node {name} did not join in 120 s"
            time.sleep(1)
        node = next(n for n in _alive_nodes(ray_head.address) if n.node_id not in known)
        yield {"pid": proc.pid, "node_id": node.node_id, "scratch": scratch}
    finally:
        local._kill_group(proc.pid)  # SIGTERM, then SIGKILL, to the node's processes only (by its pid)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
        deadline = time.monotonic() + 60  # the head marks it dead: later tests see the nodes before
        while len(_alive_nodes(ray_head.address)) > before and time.monotonic() < deadline:
            time.sleep(1)


@pytest.fixture
def second_node(ray_head, tmp_path):
    """A second node (1 CPU, resource `node-b`) of the session's head, with its own scratch."""
    with joined_node(ray_head, tmp_path, "node-b", {"node-b": 1}) as node:
        yield node


def test_a_run_spread_over_two_nodes_survives_losing_one_from_its_checkpoint_in_s3(
        ray_head, second_node, tiny_spec, s3_server, s3_data):
    from ray.util.state import list_actors

    from common.runstore import local_run
    from tests.integration.test_faults import steps_of

    storage = s3_server.uri(s3_server.bucket("ftl-two-nodes"), "runs")
    tiny_spec.update(storage=storage, data={"train": s3_data["train"], "eval": s3_data["eval"]})
    tiny_spec["train"].update(max_steps=60, report_every=10, max_failures=2)
    tiny_spec["resources"].update(workers=2, cpus_per_worker=0.5, placement="spread")
    handle = launcher.submit(tiny_spec, "ray", address=ray_head.address, submission_id="ft-two-nodes")
    deadline = time.monotonic() + 240
    while (not steps_of(local_run(handle.run_dir)) or steps_of(local_run(handle.run_dir))[-1] < 20):
        assert time.monotonic() < deadline and handle.status() in ("PENDING", "RUNNING"), handle.logs()[-3000:]
        time.sleep(1)
    workers = list_actors(address=ray_head.address, detail=True, raise_on_missing_output=False,
                          filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    assert len({w.node_id for w in workers}) == 2, workers  # spread: one worker per node
    # The worker on the second node keeps its own mirror there (another machine's disk) and
    # pushed its files to the bucket itself.
    assert any(second_node["scratch"].rglob("logs/worker-*.log")), list(second_node["scratch"].rglob("*"))

    _crash(second_node["pid"])  # the machine is gone

    assert handle.wait(timeout=400) == "SUCCEEDED", handle.logs()[-3000:]
    run = local_run(handle.run_dir)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["summary"]["steps"] == 60 and len(manifest["attempts"]) == 1
    # Rank 0's record in the manifest (it may have run on either node) survived the driver's writes.
    assert "eval_loss_before" in manifest.get("before", {}), sorted(manifest)
    assert steps_of(run) == list(range(10, 70, 10))  # every report once: none lost, none twice
    # Ray Train restarted the worker group from the bucket's checkpoint, not from step 0.
    resumed = [line for line in handle.logs().splitlines() if "[ftlaunch] resumed at step" in line]
    assert resumed and int(resumed[-1].split("resumed at step ")[1].split()[0]) >= 20, resumed


def _elastic_sizing_sees_the_nodes(ray) -> None:
    """Ray Train sizes an elastic group from Ray Data's AutoscalingCoordinator, a detached actor
    that reads the cluster's nodes every 20 s (Ray 2.60): a job submitted sooner after a node
    joined starts without it (CI saw 1 worker of 2) and only grows at Ray Train's next check, 60 s
    on. Its recompute path reads them now, as its next tick would."""
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        get_or_create_autoscaling_coordinator,
    )

    coordinator = get_or_create_autoscaling_coordinator()
    ray.get(coordinator.get_reserved_resources.remote("ftlaunch-test", recompute=True), timeout=60)


def test_elastic_workers_start_with_what_the_cluster_has_and_go_on_after_losing_a_node(
        ray_head, ray_local, tiny_spec, s3_server, s3_data, tmp_path):
    # Two nodes with one `trainer` each (the stand-in for a GPU: the head has none), a job of
    # 1 to 4 workers asking one each: it starts with the 2 the cluster has. One node is then
    # lost: Ray Train's elastic group goes on with the worker left, waiting for no replacement,
    # and the global batch stays 64 (16 x 2 accumulated on 2 workers, 16 x 4 on 1).
    from common.runfolder import read_jsonl
    from common.runstore import local_run
    from tests.integration.test_faults import steps_of

    storage = s3_server.uri(s3_server.bucket("ftl-elastic"), "runs")
    tiny_spec.update(storage=storage, data={"train": s3_data["train"], "eval": s3_data["eval"]})
    tiny_spec["train"].update(max_steps=60, report_every=10, max_failures=2, micro_batch=16, grad_accumulation=1)
    tiny_spec["resources"] = {"workers": {"min": 1, "max": 4}, "cpus_per_worker": 0.5,
                              "custom_per_worker": {"trainer": 1}}
    with joined_node(ray_head, tmp_path, "node-b", {"trainer": 1}) as node_b, \
            joined_node(ray_head, tmp_path, "node-c", {"trainer": 1}):
        _elastic_sizing_sees_the_nodes(ray_local)
        handle = launcher.submit(tiny_spec, "ray", address=ray_head.address, submission_id="ft-elastic")
        deadline = time.monotonic() + 240
        while not steps_of(local_run(handle.run_dir)) or steps_of(local_run(handle.run_dir))[-1] < 20:
            assert time.monotonic() < deadline and handle.status() in ("PENDING", "RUNNING"), handle.logs()[-3000:]
            time.sleep(1)
        _crash(node_b["pid"])  # the machine is gone, and no other takes its place
        assert handle.wait(timeout=400) == "SUCCEEDED", handle.logs()[-3000:]
    run = local_run(handle.run_dir)
    records = read_jsonl(run / "metrics.jsonl")
    assert steps_of(run) == list(range(10, 70, 10))  # every report once: none lost, none twice
    sizes = [r["workers"] for r in records]
    assert sizes[0] == 2 and sizes[-1] == 1, sizes  # started with 2 of 4; went on with 1
    assert {r["global_batch"] for r in records} == {64}, records
    assert len(json.loads((run / "manifest.json").read_text())["attempts"]) == 1  # Ray Train's own resize
