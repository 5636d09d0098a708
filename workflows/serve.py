"""`wf serve`: every trained classifier of a runs folder behind one HTTP endpoint, on Ray Serve.

find the finished jobs (``--datasets``, ``--methods``) -> one batched Classifier deployment per
model, with a bounded queue -> the gateway -> serve on HOST:PORT until stopped.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from storage.errors import SettingsError, StoreError
from storage.runs import RunsLayout
from tasks.images import DEFAULT_MAX_PIXELS
from tasks.serving import MAX_BODY_BYTES, ModelFacts
from workflows.settings import ClusterSettings

SERVE_RUNTIMES = ("onnx", "keras")


@dataclass(frozen=True)
class ServeSettings:
    runs: str = "runs"
    host: str = "127.0.0.1"
    port: int = 8000
    datasets: tuple[str, ...] | None = None
    methods: tuple[str, ...] | None = None
    replicas: int = 1
    max_replicas: int | None = None  # above replicas: autoscale between the two
    max_batch_size: int = 16
    batch_wait_ms: float = 10.0
    max_ongoing_requests: int = 32  # per replica
    max_queued_requests: int = 64  # per model; past it, HTTP 503 at once
    max_body_bytes: int = MAX_BODY_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    runtime: str = "onnx"  # or "keras": how replicas run a model.keras (model.onnx: onnxruntime)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise SettingsError(f"--port must be 1-65535, got {self.port}")
        if self.replicas < 1 or (
            self.max_replicas is not None and self.max_replicas < self.replicas
        ):
            raise SettingsError("--replicas must be >= 1 and --max-replicas >= --replicas")
        if self.runtime not in SERVE_RUNTIMES:
            raise SettingsError(f"--runtime must be onnx or keras, got {self.runtime}")
        if self.max_batch_size < 1 or self.batch_wait_ms < 0 or self.max_body_bytes < 1:
            raise SettingsError(
                "--max-batch-size, --batch-wait-ms and --max-body-mb must be positive"
            )


def find_models(settings: ServeSettings) -> list[ModelFacts]:
    """The finished jobs of the runs folder the settings select, as the gateway describes them."""
    runs = RunsLayout(settings.runs)
    found = []
    for job in runs.jobs():
        if settings.datasets and job.dataset not in settings.datasets:
            continue
        if settings.methods and job.method not in settings.methods:
            continue
        metrics = job.metrics()
        found.append(ModelFacts(
            dataset=job.dataset, method=job.method, model_uri=job.display(job.model_name),
            classes=tuple(job.classes()),
            sha256=job.index()[job.model_name]["sha256"],
            input_size=tuple(metrics["input_size"]),
            metrics={k: metrics.get(k) for k in ("accuracy", "n", "accuracy_interval", "loss",
                                                 "epochs", "per_class", "cv", "temperature")},
        ))  # fmt: skip
    if not found:
        raise StoreError(f"no trained model under {settings.runs} (run `wf train-all` first)")
    return found


def start(settings: ServeSettings, models: list[ModelFacts]) -> str:
    """Deploy the models and the gateway on the current Ray cluster; returns the base URL."""
    import logging

    from ray import serve

    from tasks.serving import Classifier
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
        Classifier.options(
            name=f"model-{facts.name}", max_ongoing_requests=settings.max_ongoing_requests,
            max_queued_requests=settings.max_queued_requests,
            ray_actor_options={"num_cpus": 0}, **scaling,
        ).bind(facts.model_uri, settings.max_pixels, settings.max_batch_size,
               settings.batch_wait_ms / 1000, settings.runtime)
        for facts in models
    ]  # fmt: skip
    gateway = Gateway.options(
        max_ongoing_requests=settings.max_ongoing_requests * len(models) * 4,
        ray_actor_options={"num_cpus": 0},
    ).bind(models, handles, settings.max_body_bytes)
    serve.run(gateway, name="wf", route_prefix="/", blocking=False)
    return f"http://{settings.host}:{settings.port}"


def serve_forever(
    settings: ServeSettings, on_ready: Callable[[str, list[ModelFacts]], None]
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
