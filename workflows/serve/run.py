"""`wf serve`: every trained classifier of a runs folder behind one HTTP endpoint, on Ray Serve.

find the finished jobs (``--datasets``, ``--methods``) -> one batched ModelDeployment per
model, with a bounded queue -> the gateway -> serve on HOST:PORT until stopped.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

from storage.errors import StoreError
from storage.runs import RunsLayout
from tasks.serving import ServedModel
from workflows.serve.settings import ServeSettings


def find_models(settings: ServeSettings) -> list[ServedModel]:
    """The finished jobs of the runs folder the settings select, as the gateway describes them."""
    runs = RunsLayout(settings.runs)
    found = []
    for job in runs.jobs():
        if settings.datasets and job.dataset not in settings.datasets:
            continue
        if settings.methods and job.method not in settings.methods:
            continue
        metrics = job.metrics()
        found.append(ServedModel(
            dataset=job.dataset, method=job.method, model_uri=job.display(job.model_name),
            classes=tuple(job.classes()),
            sha256=job.index()[job.model_name]["sha256"],
            input_size=tuple(metrics.input_size or ()),
            metrics={k: getattr(metrics, k) for k in ("accuracy", "n", "accuracy_interval", "loss",
                                                      "epochs", "per_class", "cv", "temperature")},
        ))  # fmt: skip
    if not found:
        raise StoreError(f"no trained model under {settings.runs} (run `wf train-all` first)")
    return found


def start(settings: ServeSettings, models: list[ServedModel]) -> str:
    """Deploy the models and the gateway on the current Ray cluster; returns the base URL."""
    import logging

    from ray import serve

    from tasks.serving import ModelDeployment
    from tasks.serving_gateway import Gateway

    if not settings.cluster.verbose:  # Serve's own progress lines; its replicas log to files
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    scaling = (
        {"autoscaling_config": {"min_replicas": settings.replicas,
                                "max_replicas": settings.max_replicas,
                                "target_ongoing_requests": settings.max_batch_size}}
        if settings.max_replicas and settings.max_replicas > settings.replicas
        else {"num_replicas": settings.replicas}
    )  # fmt: skip
    handles = [
        ModelDeployment.options(
            name=f"model-{served.name}", max_ongoing_requests=settings.max_ongoing_requests,
            max_queued_requests=settings.max_queued_requests,
            ray_actor_options={"num_cpus": 0}, **scaling,
        ).bind(served.model_uri, settings.max_pixels, settings.max_batch_size,
               settings.batch_wait_ms / 1000, settings.runtime)
        for served in models
    ]  # fmt: skip
    gateway = Gateway.options(
        max_ongoing_requests=settings.max_ongoing_requests * len(models) * 4,
        ray_actor_options={"num_cpus": 0},
    ).bind(models, handles, settings.max_body_bytes)
    serve.run(gateway, name="wf", route_prefix="/", blocking=False)
    return f"http://{settings.host}:{settings.port}"


def serve_forever(
    settings: ServeSettings, on_ready: Callable[[str, list[ServedModel]], None]
) -> None:
    """Serve until SIGINT or SIGTERM; then shut the applications down."""
    from ray import serve

    from workflows.cluster import ray_cluster

    models = find_models(settings)
    stop = threading.Event()
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, lambda *_: stop.set())
    with ray_cluster(settings.cluster):
        url = start(settings, models)
        on_ready(url, models)
        stop.wait()
        serve.shutdown()
