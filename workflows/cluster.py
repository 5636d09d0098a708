"""Connecting to Ray: a local cluster by default, or the cluster at an address.

A local cluster binds what Ray lets us to 127.0.0.1 (its node address; no dashboard), uses
Ray's token authentication, and is watched by :mod:`workflows.reaper`, so nothing it started
outlives ``wf``, even a ``wf`` killed with SIGKILL. On a remote cluster the ``tasks`` and
``storage`` packages are shipped to the workers through the runtime environment, so nodes need
only wf's dependencies installed.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

import storage
import tasks
from storage.errors import ClusterError
from workflows.settings import ClusterSettings, worker_env


def _start_reaper() -> subprocess.Popen | None:
    if sys.platform != "linux":
        return None
    return subprocess.Popen(
        [sys.executable, "-m", "workflows.reaper", str(os.getpid())],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, close_fds=True,
    )  # fmt: skip


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """This process's environment with ``values`` set, as it was again afterwards."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class _LeanHead:
    """A head node started inside :meth:`starting` leaves out one process Ray starts with it
    and starts another only once ``ray.init`` has returned; a one-machine cluster that lives
    for one command needs neither at start-up:

    - the autoscaler's monitor: there is nothing to scale, and on ``ray.shutdown`` it outlives
      SIGTERM for the whole second Ray grants before SIGKILL;
    - the API server: without the dashboard it serves little, and ``ray.init`` polls until it
      is up while its imports compete with the raylet's for the same two cores. Ray Train's
      controllers still ask it about actors (a multi-worker train-all was 16 s slower without
      it), so with ``api_server`` it is started on a thread after ``ray.init``; the thread
      lives until :meth:`release`, since Ray has the processes it starts killed when the
      thread that started them ends. Without ``api_server`` (extraction, the audit) it is not
      started at all: started late it still took a core from the first shards.

    Measured on 2 cores (``benchmarks/ray_startup.py``): ``ray.init`` 2.6 -> 1.9 s and
    ``ray.shutdown`` 1.35 -> 0.40 s (plus what is left of the API server's start). Ray has no
    option for either (``ray start`` has ``--no-monitor``; ``ray.init`` nothing), so the two
    methods of its ``Node`` are replaced inside :meth:`starting` only; ray is pinned below
    2.61, and the test of the local cluster checks the processes and that Ray's code is as it
    was afterwards.
    """

    def __init__(self, api_server: bool) -> None:
        self.api_server = api_server
        self.started, self.released = threading.Event(), threading.Event()
        self.thread: threading.Thread | None = None

    @contextmanager
    def starting(self) -> Iterator[None]:
        from ray._private.node import Node

        saved = {name: Node.__dict__[name] for name in ("start_api_server", "start_monitor")}
        deferred: list[Node] = []
        Node.start_api_server = lambda node, **_: deferred.append(node)
        Node.start_monitor = lambda node: None
        try:
            yield
        finally:
            for name, method in saved.items():
                setattr(Node, name, method)
        if not deferred or not self.api_server:
            self.started.set()
            return
        (node,) = deferred
        self.thread = threading.Thread(
            target=self._api_server, args=(saved["start_api_server"], node),
            name="wf-ray-api-server", daemon=True,
        )  # fmt: skip
        self.thread.start()

    def _api_server(self, start, node) -> None:
        include = node._ray_params.include_dashboard
        try:
            start(node, include_dashboard=include, raise_on_failure=bool(include))
        finally:
            self.started.set()
            self.released.wait()

    def release(self) -> None:
        self.released.set()
        if self.thread is not None:
            self.thread.join()


@contextmanager
def ray_cluster(settings: ClusterSettings, api_server: bool = True) -> Iterator[None]:
    """Run the body with Ray initialised; shut down only a cluster this call started.

    ``api_server=False`` starts a local cluster without Ray's API server at all, for a command
    that runs no Ray Train job (whose controllers ask it about actors) nor Ray Serve."""
    if ray.is_initialized():
        yield
        return
    with ExitStack() as stack:
        _start(settings, stack, api_server)
        yield


def _start(settings: ClusterSettings, stack: ExitStack, api_server: bool) -> None:
    """Initialise Ray for ``settings``; ``stack`` shuts down what this started."""
    level = logging.INFO if settings.verbose else logging.ERROR
    if settings.address:
        stack.callback(ray.shutdown)
        try:
            ray.init(
                address=settings.address,
                runtime_env={"py_modules": [tasks, storage], "env_vars": worker_env()},
                logging_level=level,
                log_to_driver=settings.verbose,
            )
        except ConnectionError as error:
            raise ClusterError(
                f"cannot connect to the Ray cluster at {settings.address}; if it uses token "
                "authentication, set RAY_AUTH_MODE=token here, with its token in "
                "~/.ray/auth_token or RAY_AUTH_TOKEN"
            ) from error
    else:
        _start_reaper()
        # Ray turns a node address of 127.0.0.1 into this host's outward address, except where
        # it believes clusters are unsupported (macOS, Windows); its agents then listen there.
        # Saying so keeps a wf-started, one-machine cluster on the loopback address.
        from ray._private import ray_constants

        loopback_only = ray_constants.ENABLE_RAY_CLUSTER
        ray_constants.ENABLE_RAY_CLUSTER = False
        # The stack's callbacks run last to first: the API server's start is over, Ray shut
        # down, its thread released, the constant restored.
        stack.callback(setattr, ray_constants, "ENABLE_RAY_CLUSTER", loopback_only)
        head = _LeanHead(api_server)
        stack.callback(head.release)
        stack.callback(ray.shutdown)
        # The workers' variables go through the raylet's own environment, which every worker
        # of a local cluster inherits, not a runtime environment: a runtime environment's
        # workers cannot be the ones the raylet starts ahead with the cluster, and the first
        # tasks then waited for new processes, one at a time (measured: 2.2-2.7 s against
        # 0.7-1.0 s to the first two tasks on 2 cores; benchmarks/ray_startup.py).
        with environment(worker_env()), head.starting():
            ray.init(
                address="local",
                num_cpus=settings.num_cpus,
                include_dashboard=False,
                log_to_driver=settings.verbose,  # worker errors still arrive as exceptions
                logging_level=level,
                # The raylet warns, on stdout, once it has started 4x this many worker processes
                # (by default the CPU count); wf's job runners, actors and Ray Train's
                # controllers take no CPU, so on a 2-core machine a plain train-all passes 8 and
                # the user is told of a problem that is none. Workers are still started only
                # when needed.
                _system_config={
                    "worker_maximum_startup_concurrency": max(
                        4, settings.num_cpus or os.cpu_count() or 1
                    )
                },
            )
        stack.callback(head.started.wait)


def on_this_node() -> NodeAffinitySchedulingStrategy:
    """Schedule on the driver's own node: what the run depends on (progress actors, job
    runners) then dies only with the driver, never with a worker node."""
    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
