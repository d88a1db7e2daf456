"""Live capacity at submit (launcher/capacity.py): a job no node can place is refused with the
cluster's shape in the line; one that must wait for busy resources is warned about. The parsing
is tested on a loopback HTTP server serving the state API's and the autoscaler report's JSON in
the shape Ray 2.60's dashboard returns (the live head: tests/integration/test_faults.py)."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from launcher.capacity import Cluster, check, check_storage, read_cluster
from launcher.errors import PlanError

URL = "http://head:8265"


def job(workers=1, cpus=1, gpus=0, **more):
    return {"workers": workers, "cpus_per_worker": cpus, "gpus_per_worker": gpus, **more}


def test_a_worker_no_node_can_hold_is_refused_with_the_cluster_shape():
    cluster = Cluster(URL, [{"CPU": 8.0}, {"CPU": 8.0}, {"CPU": 16.0, "GPU": 1.0}])
    with pytest.raises(PlanError) as err:
        check(cluster, job(gpus=2, cpus=4))
    line = str(err.value)
    assert "a worker asks {CPU: 4, GPU: 2}" in line and "2 x {CPU: 8}, 1 x {CPU: 16, GPU: 1}" in line
    assert "lower resources.cpus_per_worker / gpus_per_worker" in line and "\n" not in line
    assert check(cluster, job(gpus=1, cpus=4)) == []


def test_a_local_storage_folder_on_a_cluster_of_several_nodes_is_refused_unless_it_is_shared():
    two = Cluster(URL, [{"CPU": 8.0}, {"CPU": 8.0, "GPU": 1.0}])
    with pytest.raises(PlanError) as err:
        check_storage(two, "/home/me/runs", shared=False)
    assert str(err.value) == (
        f"storage /home/me/runs is a local folder, and the cluster at {URL} has 2 nodes (1 x {{CPU: 8}}, "
        "1 x {CPU: 8, GPU: 1}): a worker on another node would write the run where no one reads it; use "
        "storage: s3://bucket/prefix, or set storage_shared: true if every node mounts that folder")
    check_storage(two, "/mnt/nfs/runs", shared=True)  # the spec says every node mounts it
    check_storage(two, "s3://bucket/runs?endpoint_override=minio:9000", shared=False)
    check_storage(Cluster(URL, [{"CPU": 8.0}]), "/home/me/runs", shared=False)  # one node: its own disk


def test_more_workers_at_once_than_the_nodes_hold_is_refused_without_an_autoscaler():
    cluster = Cluster(URL, [{"CPU": 4.0}, {"CPU": 4.0}])
    with pytest.raises(PlanError, match=r"3 workers of \{CPU: 4\} at once, .* holds at most 2 .*workers to 2"):
        check(cluster, job(workers=3, cpus=4))
    assert check(cluster, job(workers=2, cpus=4)) == []
    # multitask: K adapter workers, of which `at_once` run together
    assert check(cluster, job(workers=6, cpus=4, at_once=2)) == []


def test_an_autoscaling_cluster_is_not_refused():
    assert check(Cluster(URL, [{"CPU": 2.0}], autoscales=True), job(gpus=8)) == []


def test_busy_resources_are_a_warning():
    cluster = Cluster(URL, [{"CPU": 4.0}], free={"CPU": 1.0})
    warnings = check(cluster, job(workers=2, cpus=2))
    assert len(warnings) == 1 and "has {CPU: 1} free now: the job waits" in warnings[0]
    assert check(Cluster(URL, [{"CPU": 4.0}], free={"CPU": 4.0}), job(workers=2, cpus=2)) == []


NODES = {"data": {"result": {"result": [
    {"state": "ALIVE", "resources_total": {"CPU": 2.0, "memory": 1.5e10, "node:127.0.0.1": 1.0}},
    {"state": "ALIVE", "resources_total": {"CPU": 4.0, "GPU": 1.0, "memory": 3e10}},
    {"state": "DEAD", "resources_total": {"CPU": 64.0, "GPU": 8.0}},
]}}}


def status(worker_types: str = ""):
    return {"data": {"autoscalingStatus": f"Cluster status: 2 nodes\n - ResourceUsage: ...\nWorker node types:{worker_types}",
                     "clusterStatus": {"loadMetricsReport": {"usage": {"CPU": [5.0, 6.0], "GPU": [0.0, 1.0],
                                                                       "object_store_memory": [0.0, 1.0]}}}}}


@pytest.fixture
def dashboard():
    """A loopback HTTP server answering the two dashboard paths read_cluster asks."""
    answers = {"/api/v0/nodes": NODES, "/api/cluster_status": status()}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps(answers[self.path.split("?")[0]]).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", answers
    server.shutdown()
    server.server_close()


def test_read_cluster_takes_alive_nodes_free_resources_and_the_autoscaler(dashboard):
    url, answers = dashboard
    cluster = read_cluster(url)
    assert cluster.nodes == [{"CPU": 2.0, "memory": 1.5e10}, {"CPU": 4.0, "GPU": 1.0, "memory": 3e10}]
    assert cluster.free == {"CPU": 1.0, "GPU": 1.0} and not cluster.autoscales
    with pytest.raises(PlanError, match=r"1 x \{CPU: 2\}, 1 x \{CPU: 4, GPU: 1\}"):
        check(cluster, job(gpus=8))  # the dead 8-GPU node does not count
    answers["/api/cluster_status"] = status("\n - gpu-workers: 0/10")
    assert read_cluster(url).autoscales


def test_a_cluster_reporting_no_alive_node_yet_is_a_warning_not_a_refusal():
    # A head that just started answers its state API before its own node registers (seen on a
    # fresh session head: `total: 0` for about a second); every cluster has at least its head.
    warnings = check(Cluster(URL, []), job(cpus=0.5))
    assert warnings and "reports no alive node yet" in warnings[0]


def test_a_head_with_driver_slots_queues_drivers_and_says_so_when_every_slot_is_taken(dashboard):
    from launcher.capacity import entrypoint_resources

    url, answers = dashboard
    assert read_cluster(url).driver_slots == 0 and entrypoint_resources(read_cluster(url)) == {}
    answers["/api/v0/nodes"] = {"data": {"result": {"result": [
        {"state": "ALIVE", "resources_total": {"CPU": 2.0, "ftlaunch_driver": 4.0}}]}}}
    usage = answers["/api/cluster_status"]["data"]["clusterStatus"]["loadMetricsReport"]["usage"]
    usage["ftlaunchDriver"] = [3.0, 4.0]  # the dashboard's camel case of the custom resource
    cluster = read_cluster(url)
    assert cluster.driver_slots == 4 and cluster.free["ftlaunch_driver"] == 1.0
    assert entrypoint_resources(cluster) == {"ftlaunch_driver": 1}
    assert not [w for w in check(cluster, job(cpus=0.5)) if "drivers at once" in w]
    usage["ftlaunchDriver"] = [4.0, 4.0]
    warnings = check(read_cluster(url), job(cpus=0.5))
    assert any("runs 4 ftlaunch drivers at once and every one is taken: the job waits PENDING" in w
               for w in warnings), warnings


def test_a_busy_resource_at_zero_is_named_with_its_zero():
    warnings = check(Cluster(URL, [{"CPU": 2.0}], free={"CPU": 0.0}), job(cpus=0.5))
    assert "has {CPU: 0} free now" in warnings[0]
