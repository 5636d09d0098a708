"""A multi-node Ray cluster on this machine, for the clustered-run tests.

A head and worker nodes, each a separate raylet with its own object store and worker processes
(``ray.cluster_utils.Cluster``), on this host's address as a real cluster's nodes are. It runs
in a process of its own, driven by lines on stdin, so a test can remove a node without grace
(SIGKILL of its raylet and everything under it) while ``wf`` runs against the cluster as a real
driver would, with ``--address``:

    add NAME CPUS      -> {"added": NAME, "node": NODE_ID}
    kill NAME          -> {"killed": NAME}
    actors             -> {"actors": [[CLASS NAME, NODE NAME, PID], ...]} (the live ones)
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
    from ray.cluster_utils import Cluster

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
        elif command == "actors":
            names = {node.node_id: name for name, node in nodes.items()}
            table = cluster.global_state.actor_table(None).values()
            say({"actors": [[a["ActorClassName"], names.get(a["Address"]["NodeID"], "?"),
                             a.get("Pid")] for a in table if a["State"] == "ALIVE"]})  # fmt: skip
        elif command == "quit":
            break
    cluster.shutdown()


class MultiNode:
    """The client side, for a test: starts this module in a process and sends it commands."""

    def __init__(self, workers: int = 2, cpus: int = 1, head_cpus: int = 1, env=None) -> None:
        import subprocess
        from pathlib import Path

        command = [sys.executable, "-m", "tests.multinode", "--workers", str(workers),
                   "--cpus", str(cpus), "--head-cpus", str(head_cpus)]  # fmt: skip
        self.process = subprocess.Popen(
            command, cwd=Path(__file__).resolve().parents[1], env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        info = self._read()
        self.address, self.nodes = info["address"], info["nodes"]

    def _read(self) -> dict:
        line = self.process.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError("the multi-node cluster process ended")
        return json.loads(line)

    def send(self, command: str) -> dict:
        self.process.stdin.write(command + "\n")  # type: ignore[union-attr]
        self.process.stdin.flush()  # type: ignore[union-attr]
        return self._read()

    def kill(self, name: str) -> None:
        self.send(f"kill {name}")
        self.nodes.pop(name)

    def add(self, name: str, cpus: int = 1) -> None:
        self.nodes[name] = self.send(f"add {name} {cpus}")["node"]

    def actors(self, class_name: str) -> list[str]:
        """The node names of the live actors of ``class_name``."""
        return [node for cls, node, _ in self.send("actors")["actors"] if cls == class_name]

    def node_of(self, class_name: str, pid: int) -> str | None:
        """The node name of the live actor of ``class_name`` in process ``pid``."""
        found = [n for c, n, p in self.send("actors")["actors"] if c == class_name and p == pid]
        return found[0] if found else None

    def close(self) -> None:
        import subprocess

        try:
            self.process.stdin.write("quit\n")  # type: ignore[union-attr]
            self.process.stdin.flush()  # type: ignore[union-attr]
            self.process.wait(60)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait(10)


def say(value: dict) -> None:
    print(json.dumps(value), flush=True)


if __name__ == "__main__":
    main()
