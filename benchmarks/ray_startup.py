"""A local Ray cluster's start-up and shut-down as wf has started one: the workers' environment
variables given as a runtime environment (wf before 2026-12-03), through the raylet's own
environment with every process Ray starts with a head node (2026-12-03), and as wf starts one
now, through `workflows.cluster.ray_cluster` (2026-12-04: no autoscaler monitor, and the API
server started after `ray.init` (`wf`) or, as for `wf extract` and `wf audit`, not at all
(`wf_extract`)).

Each way starts a fresh local cluster in its own process, `--repeats` times, the ways
alternated: seconds of `ray.init`, then until two one-CPU tasks have both answered (what the
first two shards of `wf extract` wait for), then of `ray.shutdown`, and the worker processes
that ran the tasks (a runtime environment's tasks could not use the workers the raylet starts
with the cluster). Every way gets the settings wf gives its cluster (no dashboard, loopback,
the same system config).

Usage: python benchmarks/ray_startup.py [--repeats 3] [--ways runtime_env,raylet_env,wf,wf_extract]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ONE = """
import json, os, sys, time
import ray
from workflows.settings import worker_env
from workflows.cluster import environment
from workflows.cluster import ray_cluster
from workflows.settings import ClusterSettings
from contextlib import ExitStack, nullcontext
way = sys.argv[1]
options = dict(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
               logging_level=40, _system_config={"worker_maximum_startup_concurrency": 4})
if way == "runtime_env":
    options["runtime_env"] = {"env_vars": worker_env()}
stack = ExitStack()
started = time.perf_counter()
if way in ("wf", "wf_extract"):
    stack.enter_context(ray_cluster(ClusterSettings(num_cpus=2), api_server=way == "wf"))
else:
    with (environment(worker_env()) if way == "raylet_env" else nullcontext()):
        ray.init(**options)
    stack.callback(ray.shutdown)
initialised = time.perf_counter()

@ray.remote(num_cpus=1)
def shard():
    return os.getpid(), os.environ.get("TF_ENABLE_ONEDNN_OPTS")

answers = ray.get([shard.remote(), shard.remote()])
done = time.perf_counter()
stack.close()
closed = time.perf_counter()
print(json.dumps({"init": initialised - started, "tasks": done - initialised,
                  "shutdown": closed - done,
                  "workers": len({pid for pid, _ in answers}),
                  "env": sorted({value for _, value in answers})}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ways", default="runtime_env,raylet_env,wf,wf_extract")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    env.pop("TF_ENABLE_ONEDNN_OPTS", None)  # what the workers see comes from wf alone
    results: dict[str, list[dict]] = {way: [] for way in args.ways.split(",")}
    for _ in range(args.repeats):
        for way in results:
            done = subprocess.run([sys.executable, "-c", ONE, way], capture_output=True,
                                  text=True, env=env, check=True)  # fmt: skip
            results[way].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(way, {k: round(v, 2) for k, v in results[way][-1].items() if k != "env"},
                  file=sys.stderr)  # fmt: skip
    from machine import banner

    print(banner())
    print(f"\nmedian of {args.repeats} fresh local clusters, the ways alternated\n")
    print("| way | ray.init (s) | to two tasks answered (s) | ray.shutdown (s) | sum (s) | "
          "worker processes | TF_ENABLE_ONEDNN_OPTS in workers |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for way, runs in results.items():
        init = statistics.median(r["init"] for r in runs)
        tasks = statistics.median(r["tasks"] for r in runs)
        shutdown = statistics.median(r["shutdown"] for r in runs)
        total = statistics.median(r["init"] + r["tasks"] + r["shutdown"] for r in runs)
        workers = "/".join(str(r["workers"]) for r in runs)
        values = ",".join(sorted({v for r in runs for v in r["env"] if v}))
        print(
            f"| {way} | {init:.2f} | {tasks:.2f} | {shutdown:.2f} | {total:.2f} | {workers} "
            f"| {values} |"
        )


if __name__ == "__main__":
    main()
