"""``wf serve``'s settings: which models, where to listen, and how each model's queue is bounded."""

from __future__ import annotations

from dataclasses import dataclass, field

from storage.errors import SettingsError
from tasks.images import DEFAULT_MAX_PIXELS
from workflows.settings import ClusterSettings, setting

SERVE_RUNTIMES = ("onnx", "keras")


@dataclass(frozen=True)
class ServeSettings:
    runs: str = setting("runs", "The runs folder written by `wf train-all` (a path or URI)")
    host: str = setting("127.0.0.1", "Address to listen on (127.0.0.1: this machine only)")
    port: int = setting(8000, "Port to listen on")
    datasets: tuple[str, ...] | None = setting(
        None, "Comma-separated datasets (default: every one)"
    )
    methods: tuple[str, ...] | None = setting(None, "Comma-separated methods (default: every one)")
    replicas: int = setting(1, "Replicas of each model")
    max_replicas: int | None = setting(
        None, "Autoscale each model up to this many replicas (default: off)"
    )
    max_batch_size: int = setting(16, "Requests batched into one forward pass")
    batch_wait_ms: float = setting(10.0, "Longest wait for a batch to fill, in ms")
    max_ongoing_requests: int = 32  # per replica
    max_queued_requests: int = setting(64, "Requests queued per model; past it, HTTP 503")
    max_body_mb: float = setting(20.0, "Largest request body, in MiB; past it, HTTP 413")
    max_pixels: int = DEFAULT_MAX_PIXELS
    runtime: str = setting(
        "onnx",
        "onnx: run each model.keras exported to ONNX in onnxruntime (about 2.5x Keras; checked "
        "at load, Keras kept where it differs), or keras (a model.onnx runs in onnxruntime)",
    )
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
        if self.max_queued_requests < 1:
            raise SettingsError(f"--max-queued must be >= 1, got {self.max_queued_requests}")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)
