"""`ray start` for a second node on this machine, joined to a head on loopback (the two-node
tests: a second machine cannot be had here). Ray refuses a worker node when multi-node mode is off,
which the embedded head turns off so that 127.0.0.1 stays 127.0.0.1; turned on, Ray would
rewrite the head's loopback address to this machine's external one. So this process alone acts
as if multi-node mode were on, keeps the address as given, and starts the node; the processes it
starts inherit the head's settings and talk over loopback only.

    python tests/ray_worker_node.py start --block --address=127.0.0.1:PORT ...
"""

import sys

import ray._private.ray_constants as ray_constants
import ray._private.services as services

ray_constants.ENABLE_RAY_CLUSTER = True
services.resolve_ip_for_localhost = lambda host: host

if __name__ == "__main__":
    from ray.scripts.scripts import main

    sys.argv = ["ray", *sys.argv[1:]]
    main()
