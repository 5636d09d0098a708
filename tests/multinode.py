"""A multi-node Ray cluster on this machine, for the clustered-run tests.

A head and worker nodes, each a separate raylet with its own object store and worker processes
(``ray.cluster_utils.Cluster``), all on the loopback address. It runs in a process of its own,
driven by lines on stdin, so a test can remove a node without grace (SIGKILL of its raylet and
everything under it) while ``wf`` runs against the cluster as a real driver would, with
``--address``:

    add NAME CPUS      -> {"added": NAME, "node": NODE_ID}
    kill NAME          -> {"killed": NAME}
    quit

Run as ``python -m tests.multinode --workers 2 --cpus 1``; it first prints
``{"address": ..., "nodes": {"head": ID, "worker1": ID, ...}}``.
"""

from __future__ import annotations

import argparse
import json
import sys


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=1)
    parser.add_argument("--head-cpus", type=int, default=1)
    args = parser.parse_args()
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    ray_constants.ENABLE_RAY_CLUSTER = False  # every node on 127.0.0.1 (see workflows/cluster.py)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": args.head_cpus})
    nodes = {"head": cluster.head_node}
    for index in range(args.workers):
        nodes[f"worker{index + 1}"] = cluster.add_node(num_cpus=args.cpus)
    cluster.wait_for_nodes()
    say({"address": cluster.address, "nodes": {n: node.node_id for n, node in nodes.items()}})
    for line in sys.stdin:
        command, *rest = line.split()
        if command == "add":
            name, cpus = rest
            nodes[name] = cluster.add_node(num_cpus=int(cpus))
            cluster.wait_for_nodes()
            say({"added": name, "node": nodes[name].node_id})
        elif command == "kill":
            cluster.remove_node(nodes.pop(rest[0]), allow_graceful=False)
            say({"killed": rest[0]})
        elif command == "quit":
            break
    cluster.shutdown()


def say(value: dict) -> None:
    print(json.dumps(value), flush=True)


if __name__ == "__main__":
    main()
