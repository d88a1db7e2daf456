"""The live cluster's shape at submit: a job no node can ever place is refused before it waits
`pending_timeout` for nothing; one that must wait for busy resources is warned about.

The plan's fit is checked against a resource profile; this reads the cluster the job goes to
(Ray's state API, `/api/v0/nodes`, and the autoscaler's report, `/api/cluster_status`, on the
dashboard the Jobs API is served from). A cluster that cannot be read is not refused: the check
is skipped with a warning.
"""

from __future__ import annotations

import json
import math
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Optional

from launcher.errors import PlanError

# A head that queues drivers has this custom resource (the embedded head: cluster/local.py; any
# cluster: `ray start --resources='{"ftlaunch_driver": N}'` on its head). Each ftlaunch job's
# driver then takes one, so N run at once and the rest wait PENDING in Ray's job manager with no
# process (a started driver holds ~400 MB before its first step).
DRIVER_SLOT = "ftlaunch_driver"
READ_TIMEOUT_S = 5.0
NODES_WAIT_S = 10.0  # for a just-started head's own node to show in the state API


@dataclass
class Cluster:
    url: str
    nodes: list[dict]  # per alive node: its total resources ({"CPU": 2.0, "GPU": 1.0, ...})
    free: dict = field(default_factory=dict)  # the cluster's unreserved resources now
    autoscales: bool = False  # worker node types the autoscaler may still launch
    driver_slots: float = 0  # the head's DRIVER_SLOT total (0: drivers are not queued)

    def shape(self, custom: tuple = ()) -> str:
        """`2 x {CPU: 4, GPU: 1}, 1 x {CPU: 8}`: the line a refusal shows (`custom`: those custom
        resources too)."""
        counts: dict[str, int] = {}
        for node in self.nodes:
            key = _bundle(node, custom)
            counts[key] = counts.get(key, 0) + 1
        return ", ".join(f"{n} x {key}" for key, n in counts.items()) or "no alive node"


def read_cluster(url: str, headers: Optional[dict] = None) -> Cluster:
    """The alive nodes' total resources, what is free now and whether an autoscaler may add nodes."""
    deadline = time.monotonic() + NODES_WAIT_S
    while True:  # a head that just started answers before its own node has registered
        nodes = _get(url, "/api/v0/nodes?detail=true&limit=10000", headers)["data"]["result"]["result"]
        nodes = [n.get("resources_total") or {} for n in nodes if n.get("state") == "ALIVE"]
        alive = [{k: v for k, v in n.items() if not k.startswith("node:")
                  and k not in ("object_store_memory", DRIVER_SLOT)} for n in nodes]  # custom ones kept
        if alive or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    slots = sum(float(n.get(DRIVER_SLOT, 0)) for n in nodes)
    free, autoscales = {}, False
    try:
        status = _get(url, "/api/cluster_status", headers)["data"]
        usage = ((status.get("clusterStatus") or {}).get("loadMetricsReport") or {}).get("usage") or {}
        # the dashboard writes custom resources' names in camel case (ftlaunchDriver)
        names = {"CPU": "CPU", "GPU": "GPU", "memory": "memory", DRIVER_SLOT: DRIVER_SLOT,
                 _camel(DRIVER_SLOT): DRIVER_SLOT}
        free = {names[k]: total - used for k, (used, total) in usage.items() if k in names}
        # `ray start` clusters list no worker node types; an autoscaling one lists those it may launch
        types = (status.get("autoscalingStatus") or "").partition("Worker node types:")[2]
        autoscales = bool(types.strip())
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return Cluster(url, alive, free, autoscales, slots)


def check(cluster: Cluster, resources: dict) -> list[str]:
    """Refuse (PlanError) a job no node can place, or more workers at once than the cluster holds
    when no autoscaler can add nodes; return warnings for a job that must wait for busy resources.
    `resources`: the plan's (workers, cpus_per_worker, gpus_per_worker, at_once for multitask)."""
    ask = {"CPU": float(resources.get("cpus_per_worker") or 0), "GPU": float(resources.get("gpus_per_worker") or 0),
           **{k: float(v) for k, v in (resources.get("custom_per_worker") or {}).items()}}
    # elastic workers: the job runs once min_workers are placed
    at_once = int(resources.get("at_once") or resources.get("min_workers") or resources.get("workers") or 1)
    per_node = [_fits(node, ask) for node in cluster.nodes]
    custom = tuple(k for k in ask if k not in ("CPU", "GPU"))
    worker = _bundle(ask, custom)
    queued = []
    if cluster.driver_slots and cluster.free.get(DRIVER_SLOT, cluster.driver_slots) < 1:
        queued = [f"the head at {cluster.url} runs {cluster.driver_slots:g} ftlaunch drivers at once and "
                  "every one is taken: the job waits PENDING (no process) until one ends"]
    if cluster.autoscales:
        return queued  # a node type not yet launched may hold it: Ray waits, pending_timeout bounds the wait
    if not cluster.nodes:  # every cluster has its head: the state API has not seen it yet
        return [f"the cluster at {cluster.url} reports no alive node yet; whether it can place the job "
                "was not checked"]
    if not any(per_node):
        raise PlanError(f"resources: a worker asks {worker}, and no node of the cluster at {cluster.url} "
                        f"has that ({cluster.shape(custom)}); lower resources.cpus_per_worker / gpus_per_worker"
                        f"{' / custom_per_worker' if custom else ''} or add a node that big")
    if sum(per_node) < at_once:
        raise PlanError(f"resources: {at_once} workers of {worker} at once, and the cluster at {cluster.url} "
                        f"holds at most {sum(per_node)} ({cluster.shape(custom)}); lower resources.workers to "
                        f"{sum(per_node)} or add nodes")
    plain = {k: v for k, v in ask.items() if k in ("CPU", "GPU")}  # the dashboard's usage renames the custom ones
    if cluster.free and _fits(cluster.free, plain) < at_once:
        busy = "{" + ", ".join(f"{k}: {cluster.free.get(k, 0):g}" for k, v in plain.items() if v) + "}"
        return queued + [f"the cluster at {cluster.url} has {busy} free now: the job waits for busy resources "
                         "(up to pending_timeout)"]
    return queued


def entrypoint_resources(cluster: Cluster) -> dict:
    """What a job's driver asks of the cluster: a driver slot where the head has them."""
    return {DRIVER_SLOT: 1} if cluster.driver_slots else {}


def check_storage(cluster: Cluster, storage: str, shared: bool) -> None:
    """Refuse a run folder on a local path for a cluster of several nodes (unless the spec says
    every node mounts it): a worker on another node would write its records and checkpoints
    where neither the driver nor this client reads them."""
    if "://" in storage or shared or len(cluster.nodes) <= 1:
        return
    raise PlanError(f"storage {storage} is a local folder, and the cluster at {cluster.url} has "
                    f"{len(cluster.nodes)} nodes ({cluster.shape()}): a worker on another node would write "
                    "the run where no one reads it; use storage: s3://bucket/prefix, or set "
                    "storage_shared: true if every node mounts that folder")


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def _fits(have: dict, ask: dict) -> int:
    """How many bundles of `ask` fit in `have`."""
    counts = [math.floor(have.get(k, 0) / v + 1e-9) for k, v in ask.items() if v > 0]
    return min(counts) if counts else 1 << 30


def _bundle(resources: dict, custom: tuple = ()) -> str:
    shown = {k: resources[k] for k in ("CPU", "GPU", *custom) if resources.get(k)}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in shown.items()) + "}"


def _get(url: str, path: str, headers: Optional[dict]) -> dict:
    from cluster.local import auth_headers  # this process's Ray token, where it has one

    request = urllib.request.Request(url.rstrip("/") + path, headers={**auth_headers(), **(headers or {})})
    with urllib.request.urlopen(request, timeout=READ_TIMEOUT_S) as response:
        return json.loads(response.read())
