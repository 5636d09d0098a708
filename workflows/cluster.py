"""Connecting to Ray: a local cluster by default, or the cluster at an address."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import ray

import storage
import tasks
from storage.errors import ClusterError
from workflows.settings import ClusterSettings, worker_env


@contextmanager
def ray_cluster(settings: ClusterSettings) -> Iterator[None]:
    """Run the body with Ray initialised; shut down only a cluster this call started.

    On a remote cluster the ``tasks`` and ``storage`` packages are shipped to the workers
    through the runtime environment, so nodes need only wf's dependencies installed.
    """
    if ray.is_initialized():
        yield
        return
    if settings.address:
        try:
            ray.init(
                address=settings.address,
                runtime_env={"py_modules": [tasks, storage], "env_vars": worker_env()},
                logging_level=logging.WARNING,
            )
        except ConnectionError as error:
            raise ClusterError(
                f"cannot connect to the Ray cluster at {settings.address}; if it uses token "
                "authentication, set RAY_AUTH_MODE=token here, with its token in "
                "~/.ray/auth_token or RAY_AUTH_TOKEN"
            ) from error
    else:
        ray.init(
            address="local",
            num_cpus=settings.num_cpus,
            include_dashboard=False,
            runtime_env={"env_vars": worker_env()},
            log_to_driver=False,  # worker errors still arrive as exceptions from ray.get
            logging_level=logging.WARNING,
        )
    try:
        yield
    finally:
        ray.shutdown()
